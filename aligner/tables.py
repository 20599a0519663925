"""The sweep's results as tables and a figure: every cell file under OUT/cells read into rows, summarised over
items and seeds, and written as OUT/sweep_runs.csv (a row per seed), OUT/sweep.csv and .json (the mean with its
95% bootstrap interval over items and seeds, `aligner.stats`), OUT/sweep_paired.csv (each method's paired
difference against a reference method on the same items, and what it says against the margin), OUT/sweep.md (a
table per task) and OUT/sweep.html and .png (metric against trainable parameters, per task family). Every table
names its base model's weights (`model_precision`).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import warnings
from pathlib import Path
from typing import Any, Sequence

from aligner.files import atomic_write_json, read_json
from aligner.loading import PACKAGED_MODELS
from aligner.registry import method_order
from aligner.stats import MARGIN, Estimate, bootstrap, compare, paired_difference


def model_folder(model: str) -> str:
    """A base model's name (a Hub id, a path) as one file or folder name."""
    return re.sub(r"[^\w.+-]+", "_", model).strip("_")


def model_precision(model: str) -> str:
    """What the base model's weights are, for every table that reports on it: a packaged GGUF's quantisation
    (the numbers come from a 4-bit model de-quantised, not from the original weights)."""
    if model in PACKAGED_MODELS:
        found = re.search(r"\.(q\d\w*)\.gguf$", PACKAGED_MODELS[model].filename, re.IGNORECASE)
        quant = found.group(1).upper() if found else "quantised"
        return f"{model}, {quant} GGUF de-quantised to float32"
    if model == "tiny":
        return "tiny, random weights (float32)"
    return f"{model}, weights as stored"


RUN_COLUMNS = ("model", "method", "kind", "params", "task", "family", "split", "metric", "seed", "value", "n", "lr", "steps", "best_step", "train_s", "eval_s")
SUMMARY_COLUMNS = (
    "model", "precision", "method", "kind", "params", "task", "family", "split", "metric", "n_seeds", "n_items",
    "mean", "ci_low", "ci_high", "std", "lr", "best_step", "at_budget", "train_s",
)  # fmt: skip
PAIRED_COLUMNS = (
    "model", "precision", "task", "family", "split", "metric", "method", "reference", "n_items", "difference",
    "ci_low", "ci_high", "margin", "verdict",
)  # fmt: skip
GROUP = ("model", "method", "kind", "params", "task", "family", "split", "metric")  # a summary row: these, over seeds


def run_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per cell, split and metric, from every cell file under `out/cells`; `scores` holds the per-item
    values where the cell kept them."""
    old = sorted(Path(out).glob("cells/*/*/seed*.json"))
    if old:
        raise ValueError(
            f"{old[0]} and {len(old) - 1} more cells are in the layout before cells were kept per base model: "
            f"move {Path(out) / 'cells' / 'TASK'} to {Path(out) / 'cells' / 'MODEL' / 'TASK'} (MODEL: --model's name)"
        )
    rows = []
    for path in sorted(Path(out).glob("cells/*/*/*/seed*.json")):
        cell = read_json(path)
        for split, metrics in cell["metrics"].items():
            for metric, value in metrics.items():
                keys = ("method", "kind", "params", "task", "family", "seed", "lr", "steps", "best_step", "budget", "train_s", "eval_s")
                row = {key: cell.get(key) for key in keys}
                # The most steps it could run (a cell trained before a training could go on past its budget: that).
                row["most_steps"] = cell.get("most_steps", cell.get("budget"))
                row["model"] = cell["config"]["model"]
                scores = cell.get("scores", {}).get(split, {}).get(metric)
                rows.append({**row, "split": split, "metric": metric, "value": value, "n": cell["n"][split], "scores": scores})
    return rows


def interval(rows: Sequence[dict[str, Any]]) -> Estimate | None:
    """The bootstrap estimate over the items and seeds of `rows` (one seed each), None where a cell kept no
    per-item scores or the seeds answered different numbers of items."""
    scores = [r["scores"] for r in rows]
    if any(s is None for s in scores) or len({len(s) for s in scores}) != 1:
        return None
    return bootstrap(scores)


def summarise(out: str | Path, reference: str = "lora-8", margin: float = MARGIN) -> list[dict[str, Any]]:
    """Write OUT/sweep_runs.csv, OUT/sweep.csv and OUT/sweep.json (a row per base model, method, task, split and
    metric: the mean over items and seeds with its 95% interval), OUT/sweep_paired.csv (every method against
    `reference` on the same items, read against `margin`), OUT/sweep.md, and the figure as OUT/sweep.html and
    OUT/sweep.png; return the summary rows."""
    out = Path(out)
    runs = run_rows(out)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    summary = []
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        estimate = interval(rows)
        times = [r["train_s"] for r in rows if r["train_s"] is not None]
        best = [r["best_step"] for r in rows if r["best_step"] is not None]
        at_budget = [r["best_step"] == r["steps"] == r["most_steps"] for r in rows if r["most_steps"] is not None]
        summary.append(
            {
                **dict(zip(GROUP, key)),
                "precision": model_precision(key[0]),
                "n_seeds": len(rows),
                "n_items": rows[0]["n"],
                "mean": estimate.mean if estimate else statistics.fmean(r["value"] for r in rows),
                "ci_low": estimate.low if estimate else None,
                "ci_high": estimate.high if estimate else None,
                # The spread of the seeds' means: all a cell without per-item scores (the first grid's) allows.
                "std": statistics.stdev(r["value"] for r in rows) if len(rows) > 1 else None,
                "lr": rows[0]["lr"],
                "best_step": statistics.fmean(best) if best else None,
                "at_budget": sum(at_budget) if at_budget else None,  # seeds whose best step was the last they could run
                "train_s": statistics.fmean(times) if times else None,
                "scores": [r["scores"] for r in rows],
            }
        )
    summary.sort(key=lambda r: (r["model"], r["family"], r["task"], r["split"], r["metric"], method_order(r["method"])))
    paired = paired_rows(summary, reference, margin)
    _write_csv(out / "sweep_runs.csv", RUN_COLUMNS, runs)
    _write_csv(out / "sweep.csv", SUMMARY_COLUMNS, summary)
    _write_csv(out / "sweep_paired.csv", PAIRED_COLUMNS, paired)
    summary = [{k: v for k, v in row.items() if k != "scores"} for row in summary]
    atomic_write_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(markdown_tables(summary, paired), encoding="utf-8")
    if summary:
        fig = figure(summary)
        fig.write_html(out / "sweep.html", include_plotlyjs=True)  # readable offline
        write_png(fig, out / "sweep.png")
    return summary


ZERO_SPACING = 4.0  # the methods with no parameters, drawn at 1, 4, 16, ...: apart, so that their labels do not overlap


def drawn_at(params: Sequence[int]) -> tuple[list[float], list[str]]:
    """Each point's x, its trainable parameters, the ones with none (in order) at 1, ZERO_SPACING, ...; and where
    its label goes: above, and for every other one of those with none below, as their values are often equal."""
    zeros = iter(range(len(params)))
    xs, positions = [], []
    for p in params:
        i = None if p > 0 else next(zeros)
        xs.append(float(p) if i is None else ZERO_SPACING**i)
        positions.append("bottom center" if i is not None and i % 2 else "top center")
    return xs, positions


def reference_for(method: str, reference: str) -> str:
    """What `method` is compared with: `reference`, trained in as many stages (`METHOD:then=dpo` against
    `REFERENCE:then=dpo`)."""
    then = [option for option in method.split(":")[1:] if option.startswith("then=")]
    return ":".join([reference, *then])


def paired_rows(summary: Sequence[dict[str, Any]], reference: str, margin: float) -> list[dict[str, Any]]:
    """Each method's paired difference against `reference` on the same task, split and metric (both with
    per-item scores), with its interval and `aligner.stats.compare`'s verdict."""
    by_key = {(r["model"], r["task"], r["split"], r["metric"], r["method"]): r for r in summary}
    rows = []
    for r in summary:
        counterpart = reference_for(r["method"], reference)
        base = by_key.get((r["model"], r["task"], r["split"], r["metric"], counterpart))
        if base is None or r["method"] == counterpart or None in (*r["scores"], *base["scores"]):
            continue
        if len({len(s) for s in (*r["scores"], *base["scores"])}) != 1:
            continue
        difference = paired_difference(r["scores"], base["scores"])
        rows.append(
            {
                **{k: r[k] for k in ("model", "precision", "task", "family", "split", "metric", "method", "n_items")},
                "reference": counterpart,
                "difference": difference.mean,
                "ci_low": difference.low,
                "ci_high": difference.high,
                "margin": margin,
                "verdict": compare(difference, margin),
            }
        )
    return rows


def write_png(fig: Any, path: Path) -> None:
    """`fig` as a PNG through kaleido, which drives a Chrome or Chromium of this machine (`plotly_get_chrome`
    would download one; nothing here does); without one, a warning that says so, and no PNG."""
    try:
        fig.write_image(path, scale=1.5)
    except RuntimeError as error:  # plotly's "Kaleido requires Google Chrome to be installed"
        warnings.warn(f"{path} not written: {str(error).strip()}")


def markdown_tables(summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]] = ()) -> str:
    """One table per task and base model (named with its weights' precision): a row per method (trainable
    parameters, mean training seconds), a column per split and metric, each cell "mean [95% interval]" over
    items and seeds (the seed count in brackets where it is not the most common); then each method's paired
    difference against the reference where `paired` has it, on the task's first split."""
    lines = []
    for model, task in dict.fromkeys((r["model"], r["task"]) for r in summary):
        rows = [r for r in summary if (r["model"], r["task"]) == (model, task)]
        columns = list(dict.fromkeys((r["split"], r["metric"]) for r in rows))
        seeds = statistics.mode(r["n_seeds"] for r in rows)
        lines += [f"### {task} on {rows[0]['precision']}", ""]
        lines += ["| method | params | train s | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"]
        lines.append("|" + " --- |" * (3 + len(columns)))
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = {(r["split"], r["metric"]): r for r in rows if r["method"] == method}
            first = next(iter(cells.values()))
            values = []
            for column in columns:
                r = cells.get(column)
                if r is None:
                    values.append("")
                    continue
                digits = 1 if "logprob" in column[1] else 2
                text = f"{r['mean']:.{digits}f}"
                if r["ci_low"] is not None:
                    text += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
                elif r["std"] is not None:
                    text += f" ± {r['std']:.{digits}f} (seeds' std)"
                values.append(text + (f" ({r['n_seeds']})" if r["n_seeds"] != seeds else ""))
            train_s = "" if first["train_s"] is None else f"{first['train_s']:.0f}"
            lines.append(f"| {method} | {first['params']:,} | {train_s} | " + " | ".join(values) + " |")
        lines += ["", f"{seeds} seeds per trained method; items per split: " + ", ".join(dict.fromkeys(f"{r['split']} {r['n_items']}" for r in rows)), ""]
        differences = [p for p in paired if (p["model"], p["task"]) == (model, task)]
        if differences:
            lines += [f"Paired differences (margin ±{differences[0]['margin']:.2f}):", ""]
            lines += ["| method | against | split | metric | difference [95% interval] | verdict |", "|" + " --- |" * 6]
            for p in differences:
                lines.append(
                    f"| {p['method']} | {p['reference']} | {p['split']} | {p['metric']} | "
                    f"{p['difference']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | {p['verdict']} |"
                )
            lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


# The panels of the figure: (family, split, metric, title).
PANELS = (
    ("form", "test", "form", "form tasks: form compliance (held-out facts)"),
    ("form", "test", "content", "form tasks: content kept (held-out facts)"),
    ("instruct", "test", "stops", "instruct: the answer ends its turn"),
    ("instruct", "test", "all", "instruct: ends its turn, one line, right (held-out known)"),
    ("knowledge", "taught", "content", "injection: taught facts answered"),
    ("knowledge", "unknown_heldout", "content", "injection: held-out unknown facts"),
    ("value", "harmful", "refusal", "value: refusal of held-out harmful"),
    ("value", "benign", "refusal", "value: over-refusal of held-out benign"),
)


def figure(summary: Sequence[dict[str, Any]]) -> Any:
    """Metric against trainable parameters (log x; methods with none drawn at 1) per task family and split,
    one colour per task (and base model), error bars the 95% interval over items and seeds; variants
    (`aligner-1:lr=...`) left out."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = [r for r in summary if ":" not in r["method"]]  # variants (aligner-1:lr=...) share their method's x
    several_models = len({r["model"] for r in summary}) > 1

    def series(row: dict[str, Any]) -> str:  # a colour each: the task, on its base model where there are several
        return f"{row['task']} on {row['model']}" if several_models else row["task"]

    panels = [p for p in PANELS if any(r["family"] == p[0] and r["split"] == p[1] and r["metric"] == p[2] for r in summary)]
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[p[3] for p in panels], horizontal_spacing=0.08)
    colours = {}
    for index, (family, split, metric, _) in enumerate(panels):
        row, col = index // columns + 1, index % columns + 1
        selected = [r for r in summary if r["family"] == family and r["split"] == split and r["metric"] == metric]
        for task in sorted({series(r) for r in selected}):
            points = sorted((r for r in selected if series(r) == task), key=lambda r: r["params"])
            colour = colours.setdefault(task, len(colours))
            xs, positions = drawn_at([r["params"] for r in points])
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[r["mean"] for r in points],
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=[0 if r["ci_high"] is None else r["ci_high"] - r["mean"] for r in points],
                        arrayminus=[0 if r["ci_low"] is None else r["mean"] - r["ci_low"] for r in points],
                    ),
                    mode="markers+text",
                    text=[r["method"] for r in points],
                    textposition=positions,
                    textfont=dict(size=9),
                    name=task,
                    legendgroup=task,
                    showlegend=task not in {t.name for t in fig.data},
                    marker=dict(size=8, color=f"hsl({colour * 67 % 360}, 65%, 45%)"),
                    customdata=[r["params"] for r in points],
                    hovertemplate="%{text}<br>params %{customdata:,}<br>%{y:.2f}<extra>" + task + "</extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(type="log", title_text="trainable parameters (none: drawn at 1, 4, 16, ... apart)", row=row, col=col)
        fig.update_yaxes(range=[-0.14, 1.14], row=row, col=col)  # room for the labels above 1 and below 0
    precisions = "; ".join(sorted({model_precision(r["model"]) for r in summary}))
    fig.update_layout(height=360 * rows, width=1200, title=f"Form vs knowledge: methods on the same frozen model ({precisions})")
    return fig
