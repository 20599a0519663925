"""What the base model knows, asked once and cached: the facts the suite's form tasks are built on (known ones
keep the content checkable) and its injection tasks avoid (unknown ones are taught).

    audit         which facts of a knowledge set the base model knows: its greedy answer to the trained question
                  states a gold answer (`states_answer`); for a base model, after a few answered questions
                  (`demonstrations`)
    task_data     a task's splits, cut from the audit of its knowledge set where it has one
    cached_answers  the base model's greedy answers, kept per weights fingerprint in the project's cache
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from aligner.chat import BASE_TEMPLATE
from aligner.files import atomic_write_json, read_json
from aligner.generation import answer
from aligner.loading import cache_dir, mark_used, model_fingerprint
from aligner.tasks import KNOWLEDGE_SETS, Fact, KnowledgeSet, Sizes, Task, TaskData
from aligner.tasks.knowledge import text_before_answer
from aligner.tasks.spec import shuffled

AUDIT_TOKENS = 24  # new tokens of an audit answer: "The capital of X is Y." and more fit


def cached_answers(
    model: nn.Module,
    fingerprint: str,
    prompts: Sequence[str],
    system: str | None,
    max_new_tokens: int,
    batch_size: int = 16,
    raw_prompts: bool = False,
) -> list[str]:
    """Greedy answers of the base model alone, read from the cache of its weights `fingerprint` where present;
    the missing ones are generated (batched) and added. `raw_prompts`: as `answer`'s."""
    settings = [system, max_new_tokens] + (["raw"] if raw_prompts else [])  # raw apart: older caches stay valid
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    path = cache_dir() / "answers" / f"{fingerprint[:16]}-{key}.json"
    cache = read_json(path) if path.is_file() else {}
    if cache:
        mark_used(path)
    missing = sorted({p for p in prompts if p not in cache})
    if missing:
        answers = answer(model, None, missing, system, max_new_tokens, batch_size, raw_prompts=raw_prompts)
        cache.update(zip(missing, answers))
        atomic_write_json(path, cache)
    return [cache[p] for p in prompts]


# Saying that the answer is not something, or that there is none: "The capital of Hong Kong is not a physical
# place", "... does not have a capital", "There is no ...". A contrast after the answer ("Canberra, not Sydney")
# is none of these.
NEGATION = re.compile(
    r"\b(?:is|are|was|were)\s+(?:not|no)\b|\b(?:isn't|aren't|wasn't|weren't)\b"
    r"|\b(?:does|do|did)\s+not\s+have\b|\b(?:doesn't|don't|didn't)\s+have\b|\b(?:has|have|had)\s+no\b"
    r"|\bthere(?:\s+is|'s|\s+are|\s+was)\s+no\b|\bno\s+(?:official\s+|single\s+)?capital\b|\bneither\b",
    re.IGNORECASE,
)
FIRST_SENTENCE = re.compile(r"[.!?](?:\s|$)|\n")


def states_answer(knowledge: KnowledgeSet, text: str, answers: Sequence[str]) -> bool:
    """Whether `text` gives one of `answers` as the answer: holds it, and says no negation (`NEGATION`) in its first
    sentence or before the answer. "The capital of Hong Kong is not a physical place ... Hong Kong" holds a gold
    answer and still does not know it; an answer that corrects a negation ("is not Sydney but Canberra") is
    counted as not known too, the side a set of known facts can afford to err on."""
    text = text.replace("\u2019", "'")  # "doesn’t" as "doesn't"
    before = text_before_answer(text, answers, knowledge.case_sensitive)
    if before is None:
        return False
    first_sentence = FIRST_SENTENCE.split(text, maxsplit=1)[0]
    return not (NEGATION.search(first_sentence) or NEGATION.search(before))


@dataclass(frozen=True)
class Audit:
    knowledge: str
    answers: dict[str, str]  # subject -> the base model's answer to the audit question
    known: frozenset[str]  # subjects whose answer holds a gold answer


def audit(
    model: nn.Module,
    knowledge: KnowledgeSet,
    fingerprint: str | None = None,
    system: str | None = None,
    batch_size: int = 16,
    shots: int = 0,
) -> Audit:
    """Ask the base model every fact of `knowledge` with the trained question template, greedily; a fact is known
    when the answer states a gold answer (`states_answer`: whole words, accents and, unless case-sensitive, case
    ignored; not negated).
    With `shots`, the question follows that many answered ones (`demonstrations`), which are never known."""
    fingerprint = fingerprint or model_fingerprint(model)
    facts = knowledge.facts()
    shown = demonstrations(knowledge, shots)
    if shown:
        examples = "\n\n".join(f"{BASE_TEMPLATE.format(prompt=knowledge.question(f))} {knowledge.sentence(f)}" for f in shown)
        system = examples if system is None else f"{system}\n\n{examples}"
    questions = [knowledge.question(f) for f in facts]
    answers = cached_answers(model, fingerprint, questions, system, AUDIT_TOKENS, batch_size)
    shown_subjects = {f.subject for f in shown}
    known = frozenset(
        f.subject for f, a in zip(facts, answers) if f.subject not in shown_subjects and states_answer(knowledge, a, f.answers)
    )
    return Audit(knowledge.name, {f.subject: a for f, a in zip(facts, answers)}, known)


def demonstrations(knowledge: KnowledgeSet, shots: int) -> list[Fact]:
    """The facts a few-shot audit shows answered, the same for every question: the last `shots` in the order the
    splits are cut from. A base model has no turns to answer in, and a bare question reads less of what it knows
    (Gemma-3-270M: 80 of 250 capitals); in its own format, "Question: ...\nAnswer: The capital of ... is ...", a few
    answered ones show it the form of an answer. For a chat model they come as its system prompt."""
    if shots < 0:
        raise ValueError(f"audit shots must be >= 0, got {shots}")
    facts = shuffled(knowledge.facts())
    if shots >= len(facts):
        raise ValueError(f"{knowledge.name}: {shots} audit shots leave none of its {len(facts)} facts to audit")
    return facts[len(facts) - shots :]




def task_data(
    model: nn.Module,
    task: Task,
    sizes: Sizes,
    known_only: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    audit_shots: int = 0,
    fingerprint: str | None = None,
    audits: dict[str, Audit] | None = None,
) -> TaskData:
    """The splits of `task`, from the audit of its knowledge set where it has one, and of those it asks about in
    evaluation alone (`known_only`; False: any fact, for a random model). `audits` keeps each knowledge set's audit
    across the tasks that share it."""
    if task.knowledge is None or not known_only:
        return task.build(None, sizes)
    audits = {} if audits is None else audits
    for name in (task.knowledge, *task.other_knowledge):
        if name not in audits:
            audits[name] = audit(model, KNOWLEDGE_SETS[name], fingerprint, system, batch_size, audit_shots)
    if not task.other_knowledge:
        return task.build(audits[task.knowledge].known, sizes)
    return task.build(audits[task.knowledge].known, sizes, {name: audits[name].known for name in task.other_knowledge})


def write_audit(result: Audit, knowledge: KnowledgeSet, path: Path) -> None:
    """One row per fact: subject, gold answers, its labels, the base model's answer, known."""
    facts = knowledge.facts()
    label_names = sorted({name for f in facts for name in f.labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "answers", *label_names, "base_answer", "known"])
        for fact in facts:
            labels = [fact.labels.get(name, "") for name in label_names]
            known = fact.subject in result.known
            writer.writerow([fact.subject, " | ".join(fact.answers), *labels, result.answers[fact.subject], int(known)])
