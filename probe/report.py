"""A report as three files: report.html (self-contained, opens offline), metrics.json and summary.md.

Sections are numbered (§1, §2, ...) and each holds text, plotly figures and tables; every number that the
summary quotes is also in metrics.json under the key of the section it comes from. The HTML carries plotly.js
itself, so that it opens offline, gzip-compressed and base64-encoded, so that a committed report stays small, and
unpacked by the browser's own `DecompressionStream` when the page opens; the figures are plotly JSON, drawn once
it has loaded.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from aligner.files import atomic_write_bytes, json_bytes

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: 1em 0; } td, th { border: 1px solid #ddd; padding: 3px 7px; }
th { background: #f3f3f3; } .figure { min-height: 420px; } pre { background: #f7f7f7; padding: 1em; white-space: pre-wrap; }
nav li { margin: .2em 0; } .caption { color: #555; font-size: .9em; }
"""
LOADER = """
(async () => {
  const packed = document.getElementById("plotly-gzip-base64").textContent;
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const code = await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
  const script = document.createElement("script");
  script.textContent = code;
  document.head.appendChild(script);
  const figures = JSON.parse(document.getElementById("figures").textContent);
  for (const [id, fig] of Object.entries(figures)) Plotly.newPlot(id, fig.data, fig.layout, {responsive: true});
})();
"""


@dataclass
class Section:
    key: str  # its key in metrics.json
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("text" | "figure" | "table" | "pre", content)

    def text(self, paragraph: str) -> "Section":
        self.blocks.append(("text", paragraph))
        return self

    def figure(self, fig: go.Figure) -> "Section":
        self.blocks.append(("figure", fig))
        return self

    def table(self, frame: pd.DataFrame, caption: str = "") -> "Section":
        self.blocks.append(("table", (frame, caption)))
        return self

    def pre(self, text: str) -> "Section":
        self.blocks.append(("pre", text))
        return self


class Report:
    """Sections, metrics and a summary, written out by `write`."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[Section] = []
        self.metrics: dict[str, Any] = {}

    def section(self, key: str, title: str) -> Section:
        self.sections.append(Section(key, title))
        return self.sections[-1]

    def ref(self, key: str) -> str:
        """"§n" of the section with `key`, for the summary to cite."""
        return f"§{[s.key for s in self.sections].index(key) + 1}"

    def show(self, *keys: str) -> None:
        """Display the sections with `keys` (every section without) in a Jupyter notebook, as report.html draws
        them: text, plotly figures, tables with their captions."""
        from IPython.display import (  # imported here: only a notebook needs IPython
            HTML,
            display,
        )

        unknown = set(keys) - {s.key for s in self.sections}
        if unknown:
            raise ValueError(f"no sections {sorted(unknown)}; this report has {', '.join(s.key for s in self.sections)}")
        for section in self.sections:
            if keys and section.key not in keys:
                continue
            display(HTML(f"<h3>{self.ref(section.key)} {html.escape(section.title)}</h3>"))
            for kind, content in section.blocks:
                if kind == "text":
                    display(HTML(f"<p>{html.escape(content)}</p>"))
                elif kind == "pre":
                    display(HTML(f"<pre>{html.escape(content)}</pre>"))
                elif kind == "figure":
                    display(content)
                else:
                    frame, caption = content
                    display(frame)
                    if caption:
                        display(HTML(f"<p><i>{html.escape(caption)}</i></p>"))

    def write(self, out: str | Path, summary: str) -> dict[str, Path]:
        out = Path(out)
        paths = {"html": out / "report.html", "metrics": out / "metrics.json", "summary": out / "summary.md"}
        atomic_write_bytes(paths["html"], self.html(summary).encode())
        atomic_write_bytes(paths["metrics"], json_bytes(jsonable(self.metrics)))
        atomic_write_bytes(paths["summary"], summary.encode())
        return paths

    def html(self, summary: str) -> str:
        figures, parts = {}, []
        toc = "".join(f'<li><a href="#{s.key}">§{i} {html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections, 1))
        for i, section in enumerate(self.sections, 1):
            parts.append(f'<section id="{section.key}"><h2>§{i} {html.escape(section.title)}</h2>')
            for kind, content in section.blocks:
                if kind == "text":
                    parts.append(f"<p>{html.escape(content)}</p>")
                elif kind == "pre":
                    parts.append(f"<pre>{html.escape(content)}</pre>")
                elif kind == "figure":
                    figure_id = f"figure-{len(figures)}"
                    figures[figure_id] = json.loads(content.to_json())
                    parts.append(f'<div class="figure" id="{figure_id}"></div>')
                else:
                    frame, caption = content
                    parts.append(frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0))
                    if caption:
                        parts.append(f'<p class="caption">{html.escape(caption)}</p>')
            parts.append("</section>")
        plotly_js = resources.files("plotly").joinpath("package_data/plotly.min.js").read_bytes()
        packed = base64.b64encode(gzip.compress(plotly_js, 9, mtime=0)).decode()
        figures_json = json.dumps(figures, separators=(",", ":")).replace("</", "<\\/")  # no early </script>
        return (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            f"<h2>Summary</h2><pre>{html.escape(summary)}</pre><nav><ol>{toc}</ol></nav>{''.join(parts)}"
            f'<script id="plotly-gzip-base64" type="application/octet-stream">{packed}</script>'
            f'<script id="figures" type="application/json">{figures_json}</script>'
            f"<script>{LOADER}</script></body></html>"
        )


def jsonable(value: Any) -> Any:
    """`value` with DataFrames as lists of records, numpy scalars and arrays as Python ones, NaN as None."""
    if isinstance(value, pd.DataFrame):
        return jsonable(value.to_dict(orient="records"))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
