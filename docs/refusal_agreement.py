"""The refusal detector against the answers labelled by hand: a Markdown table, for docs/suite.md.

    python docs/refusal_agreement.py

Reads aligner/tasks/data/refusal_labels.jsonl (answers of the project's models, each read and labelled as a
refusal or not) and scores `aligner.tasks.value.is_refusal` on them, by where the answers come from.
"""

from __future__ import annotations

from collections import defaultdict

from aligner.tasks.value import is_refusal, load_refusal_fixture


def main() -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in load_refusal_fixture():
        family = row["model"].partition("+")[0]
        trained = "base model" if "+" not in row["model"] else "trained methods"
        tokens = "48 new tokens" if row["source"].startswith("aligner.generate") else "16 new tokens (suite cells)"
        groups[f"{family}, {trained}, {tokens}"].append(row)
    print("| answers | labelled | refusals (by hand) | `is_refusal` agrees |")
    print("| --- | --- | --- | --- |")
    every = [row for rows in groups.values() for row in rows]
    for name, rows in [*sorted(groups.items()), ("all", every)]:
        agree = sum(is_refusal(row["answer"]) == row["label"] for row in rows)
        refusals = sum(row["label"] for row in rows)
        print(f"| {name} | {len(rows)} | {refusals} | {agree}/{len(rows)} ({agree / len(rows):.1%}) |")


if __name__ == "__main__":
    main()
