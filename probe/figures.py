"""The figures of the model report and the app, drawn from the tables that `probe.analyses`, `probe.gates` and
`probe.embeddings` compute: each function lays a table out as a plotly figure and computes nothing, so that a
figure in report.html and the same one in the app always show the same numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from aligner.model import Aligner
from probe.gates import gate_table

NULL_BANDS = (("random", "rgba(120,120,120,0.25)"), ("covariance", "rgba(230,120,30,0.25)"))  # null, band colour


def layer_head_heatmap(
    table: pd.DataFrame, column: str, title: str, label: str | None = None, limit: float | None = None
) -> go.Figure:
    """Layers × heads heatmap of `column` of a table with a row per layer and head (signed colour scale centred
    on 0, from -limit to limit; default: the table's largest |value|); `label` names the colour bar (default:
    the column)."""
    grid = table.pivot(index="layer", columns="head", values=column)
    limit = limit or float(np.abs(grid.values).max()) or 1.0
    return px.imshow(
        grid, color_continuous_scale="RdBu_r", zmin=-limit, zmax=limit, aspect="auto", title=title,
        labels={"x": "head", "y": "layer", "color": label or column},
    )


def gate_heatmap(aligner: Aligner, title: str, limit: float | None = None) -> go.Figure:
    """Layers × heads heatmap of the gates (signed, centred colour scale up to `limit`: give several heatmaps the
    same one, `probe.gates.gate_range`, and their colours compare)."""
    return layer_head_heatmap(gate_table(aligner), "gate", title, limit=limit)


def prefix_share_heatmap(table: pd.DataFrame, title: str) -> go.Figure:
    """Layers × heads heatmap of the ratio |g A V_p| / |z_context| (column share) of a table with rows per layer
    and head (`probe.gates.head_activity`; or `prefix_attention` at one position, whose slots repeat each head's)."""
    grid = table.drop_duplicates(["layer", "head"]).pivot(index="layer", columns="head", values="share")
    return px.imshow(
        grid, aspect="auto", color_continuous_scale="Viridis", title=title,
        labels={"x": "head", "y": "layer", "color": "|g A V_p| / |z|"},
    )


def slot_attention_heatmap(table: pd.DataFrame, title: str) -> go.Figure:
    """Layers × prefix slots heatmap of one head's attention onto the prefix (`prefix_attention` rows of one head
    and position); it sums to 1 over the slots, hence the fixed [0, 1] scale."""
    grid = table.pivot(index="layer", columns="slot", values="attention")
    return px.imshow(
        grid, aspect="auto", zmin=0, zmax=1, color_continuous_scale="Blues", title=title,
        labels={"x": "prefix slot", "y": "layer", "color": "attention"},
    )


def gate_profile_figure(profiles: pd.DataFrame, title: str) -> go.Figure:
    """Mean |gate| per layer against relative depth, a line per run (`probe.gates.gate_profiles`)."""
    return px.line(profiles, x="depth", y="mean_abs", color="run", markers=True, title=title)


def gate_scale_figure(curve: pd.DataFrame, title: str) -> go.Figure:
    """Form compliance and content accuracy against the gate scale s (`probe.gates.gate_scale_curve`)."""
    long = curve.melt(id_vars="scale", value_vars=["form", "content"], var_name="measure", value_name="share")
    return px.line(long, x="scale", y="share", color="measure", markers=True, title=title)


def layer_ablation_figure(ablation: pd.DataFrame, title: str) -> go.Figure:
    """Form compliance and content accuracy with one adapted layer's gates off, per layer (`ablation_curves`)."""
    single = ablation[ablation["mode"] == "single"]
    long = single.melt(id_vars="layer", value_vars=["form", "content"], var_name="measure", value_name="share")
    return px.line(long, x="layer", y="share", color="measure", markers=True, title=title)


def cumulative_ablation_figure(ablation: pd.DataFrame, title: str) -> go.Figure:
    """Form compliance and content accuracy with the top or bottom k layers' gates off, against k."""
    cumulative = ablation[ablation["mode"] != "single"]
    long = cumulative.melt(id_vars=["mode", "n_off"], value_vars=["form", "content"], var_name="measure", value_name="share")
    return px.line(long, x="n_off", y="share", color="measure", line_dash="mode", markers=True, title=title)


def probe_figure(results: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy per layer with its interval, one line per (target, scored_on), and the majority-class rate."""
    frame = results.assign(curve=results.target + " / " + results.scored_on)
    fig = px.line(
        frame, x="layer", y="accuracy", color="curve", markers=True, title=title,
        error_y=frame.ci_high - frame.accuracy, error_y_minus=frame.accuracy - frame.ci_low,
    )
    fig.add_hline(y=float(results.chance.iloc[0]), line_dash="dot", annotation_text="majority class")
    return fig


def geometry_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """The observed overlap per layer over the 5-95% bands of both nulls (`probe.geometry.layer_geometry`)."""
    fig = go.Figure()
    for null, colour in NULL_BANDS:
        fig.add_trace(go.Scatter(x=table.layer, y=table[f"{null}_q95"], mode="lines", line={"width": 0}, showlegend=False))
        fig.add_trace(
            go.Scatter(
                x=table.layer, y=table[f"{null}_q05"], mode="lines", line={"width": 0}, fill="tonexty",
                fillcolor=colour, name=f"{null} null, 5-95%",
            )
        )
    fig.add_trace(go.Scatter(x=table.layer, y=table.overlap, mode="lines+markers", name="observed", line={"color": "black"}))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="overlap (mean cos² of principal angles)")
    return fig


def scatter(
    frame: pd.DataFrame, color: str, title: str, hover: Sequence[str] = (), symbol: str | None = None, selectable: bool = False,
    axes: Sequence[str] | None = None,
) -> go.Figure:
    """A scatter plot of an embedding frame (`probe.embeddings`), coloured by `color`, with `hover` columns in the
    hover text, its axes named by `axes` (default: the frame's attrs["axes"]). `selectable`: each point carries its
    row's index label as custom data, so that a selection in the app names the frame's rows."""
    custom = {"custom_data": ["row"]} if selectable else {}
    data = frame.reset_index(names="row") if selectable else frame
    fig = px.scatter(data, x="x", y="y", color=color, symbol=symbol, hover_data=list(hover), title=title, **custom)
    fig.update_traces(marker={"size": 7, "opacity": 0.8})
    names = axes if axes is not None else frame.attrs.get("axes")
    if isinstance(names, (list, tuple)):
        fig.update_layout(xaxis_title=names[0], yaxis_title=names[1])
    return fig


def loss_figure(losses: pd.DataFrame, title: str) -> go.Figure:
    """Training loss against step, a line per run, on a log scale labelled at 1, 2 and 5 of each decade
    (`probe.analyses.loss_table`)."""
    fig = px.line(losses, x="step", y="loss", color="run", log_y=True, title=title)
    positive = losses.loss[losses.loss > 0]
    if len(positive):
        low, high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
        ticks = [m * 10.0**e for e in range(low, high + 1) for m in (1, 2, 5)]
        fig.update_yaxes(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks], title_text="loss (log scale)")
    return fig


def efficiency_figure(points: pd.DataFrame, title: str) -> go.Figure:
    """The suite's metric against trainable parameters (log x), a panel per task family and metric, a colour per
    method family, a symbol per task, error bars the suite's interval (`probe.explore.efficiency_frame`)."""
    fig = px.scatter(
        points, x="params", y="mean", color="method family", symbol="task", facet_col="panel", facet_col_wrap=2,
        error_y="above", error_y_minus="below", log_x=True, hover_data=["method", "model", "n_seeds"], title=title,
        category_orders={"panel": list(dict.fromkeys(points.panel))}, facet_row_spacing=0.08, facet_col_spacing=0.06,
        height=320 * max(1, math.ceil(points.panel.nunique() / 2)),
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_xaxes(title_text="trainable parameters (none: at 1)")
    fig.update_yaxes(title_text="share of items", range=[-0.05, 1.05])
    return fig
