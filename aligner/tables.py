"""The sweep's results as tables and a figure: every cell file under OUT/cells read into rows, summarised over
seeds, and written as OUT/sweep_runs.csv (a row per seed), OUT/sweep.csv and .json (mean and std over seeds),
OUT/sweep.md (a table per task) and OUT/sweep.html and .png (metric against trainable parameters, per task
family).
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
from aligner.registry import method_order


def model_folder(model: str) -> str:
    """A base model's name (a Hub id, a path) as one file or folder name."""
    return re.sub(r"[^\w.+-]+", "_", model).strip("_")


RUN_COLUMNS = ("model", "method", "kind", "params", "task", "family", "split", "metric", "seed", "value", "n", "steps", "best_step", "train_s", "eval_s")
SUMMARY_COLUMNS = ("model", "method", "kind", "params", "task", "family", "split", "metric", "n_seeds", "mean", "std", "train_s")
GROUP = ("model", "method", "kind", "params", "task", "family", "split", "metric")  # a summary row: these, over seeds


def run_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per cell, split and metric, from every cell file under `out/cells`."""
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
                row = {key: cell.get(key) for key in ("method", "kind", "params", "task", "family", "seed", "steps", "best_step", "train_s", "eval_s")}
                row["model"] = cell["config"]["model"]
                rows.append({**row, "split": split, "metric": metric, "value": value, "n": cell["n"][split]})
    return rows


def summarise(out: str | Path) -> list[dict[str, Any]]:
    """Write OUT/sweep_runs.csv, OUT/sweep.csv and OUT/sweep.json (mean and sample std over seeds; std empty for
    one seed; a row per base model, method, task, split and metric), OUT/sweep.md, and the figure as OUT/sweep.html
    and OUT/sweep.png; return the summary rows."""
    out = Path(out)
    runs = run_rows(out)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    summary = []
    for key, rows in groups.items():
        values = [r["value"] for r in rows]
        times = [r["train_s"] for r in rows if r["train_s"] is not None]
        summary.append(
            {
                **dict(zip(GROUP, key)),
                "n_seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "train_s": statistics.fmean(times) if times else None,
            }
        )
    summary.sort(key=lambda r: (r["model"], r["family"], r["task"], r["split"], r["metric"], method_order(r["method"])))
    _write_csv(out / "sweep_runs.csv", RUN_COLUMNS, runs)
    _write_csv(out / "sweep.csv", SUMMARY_COLUMNS, summary)
    atomic_write_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(markdown_tables(summary), encoding="utf-8")
    if summary:
        fig = figure(summary)
        fig.write_html(out / "sweep.html", include_plotlyjs=True)  # readable offline
        write_png(fig, out / "sweep.png")
    return summary


def write_png(fig: Any, path: Path) -> None:
    """`fig` as a PNG through kaleido, which drives a Chrome or Chromium of this machine (`plotly_get_chrome`
    would download one; nothing here does); without one, a warning that says so, and no PNG."""
    try:
        fig.write_image(path, scale=1.5)
    except RuntimeError as error:  # plotly's "Kaleido requires Google Chrome to be installed"
        warnings.warn(f"{path} not written: {str(error).strip()}")


def markdown_tables(summary: Sequence[dict[str, Any]]) -> str:
    """One table per task: a row per method (trainable parameters, mean training seconds), a column per split
    and metric, each cell "mean ± std" over seeds (the seed count in brackets when it is not 2)."""
    lines = []
    models = list(dict.fromkeys(r["model"] for r in summary))
    for model, task in dict.fromkeys((r["model"], r["task"]) for r in summary):
        rows = [r for r in summary if (r["model"], r["task"]) == (model, task)]
        columns = list(dict.fromkeys((r["split"], r["metric"]) for r in rows))
        lines += [f"### {task}" + (f" on {model}" if len(models) > 1 else ""), "", "| method | params | train s | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"]
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
                text = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
                values.append(text + (f" ({r['n_seeds']})" if r["n_seeds"] != 2 else ""))
            train_s = "" if first["train_s"] is None else f"{first['train_s']:.0f}"
            lines.append(f"| {method} | {first['params']:,} | {train_s} | " + " | ".join(values) + " |")
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
    one colour per task (and base model), error bars one std over seeds; variants (`aligner-1:lr=...`) left out."""
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
            fig.add_trace(
                go.Scatter(
                    x=[max(r["params"], 1) for r in points],
                    y=[r["mean"] for r in points],
                    error_y=dict(type="data", array=[r["std"] or 0 for r in points]),
                    mode="markers+text",
                    text=[r["method"] for r in points],
                    textposition="top center",
                    textfont=dict(size=9),
                    name=task,
                    legendgroup=task,
                    showlegend=task not in {t.name for t in fig.data},
                    marker=dict(size=8, color=f"hsl({colour * 67 % 360}, 65%, 45%)"),
                    hovertemplate="%{text}<br>params %{x:,}<br>%{y:.2f}<extra>" + task + "</extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(type="log", title_text="trainable parameters (none: drawn at 1)", row=row, col=col)
        fig.update_yaxes(range=[-0.06, 1.14], row=row, col=col)  # room for the labels above 1
    fig.update_layout(height=360 * rows, width=1200, title="Form vs knowledge: methods on the same frozen model")
    return fig
