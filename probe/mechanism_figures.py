"""The figures of the mechanism analyses (`probe.lens`, `probe.dissociation`, `probe.shift`): each lays out a
table those functions return and computes nothing but means and medians over items, so that a report and the app
drawing the same table show the same numbers."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probe.lens import READOUT_TARGETS
from probe.shift import SHIFTS, shift_shares

SHIFT_COLOURS = {"unshifted": "#4c78a8", "marginal": "#f2cf5b", "shifted": "#e45756"}


def logit_lens_figure(lens: pd.DataFrame, title: str) -> go.Figure:
    """The gold answer's median rank (log axis) and mean log-probability under the logit lens, per layer, a line
    per condition (`probe.lens.logit_lens`)."""
    per_layer = lens.groupby(["condition", "layer"]).agg(rank=("rank", "median"), logprob=("logprob", "mean")).reset_index()
    figure = make_subplots(rows=1, cols=2, subplot_titles=("median rank of the gold token", "mean log-probability"))
    for i, (condition, group) in enumerate(per_layer.groupby("condition", sort=False)):
        colour = px.colors.qualitative.Plotly[i % len(px.colors.qualitative.Plotly)]
        for col, measure in ((1, "rank"), (2, "logprob")):
            figure.add_trace(
                go.Scatter(x=group["layer"], y=group[measure], mode="lines+markers", name=condition,
                           legendgroup=condition, showlegend=col == 1, line={"color": colour}),
                row=1, col=col,
            )
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_xaxes(title_text="layer")
    return figure.update_layout(title=title)


def token_readout_figure(readout: pd.DataFrame, title: str) -> go.Figure:
    """What each adapted layer's gated prefix writes onto the logits (`probe.lens.token_readout`), one panel per
    position read: its promoted and suppressed tokens, labelled, against the mean of what it writes on the token
    the position predicts (the form's first at the response start, the gold answer's first at the answer)."""
    written = readout[readout["kind"].isin(["promoted", "suppressed"])]
    positions = list(dict.fromkeys(written["position"]))
    figure = px.scatter(
        written, x="layer", y="value", color="kind", text="token", hover_data=["rank", "token_id"], title=title,
        facet_col="position", category_orders={"position": positions}, labels={"value": "logit written (centred)"},
    )
    figure.update_traces(textposition="middle right", textfont_size=9)
    for column, position in enumerate(positions, start=1):
        target = readout[(readout["kind"] == "target") & (readout["position"] == position)]
        figure.add_trace(
            go.Scatter(x=target["layer"], y=target["value"], mode="lines+markers", name=f"{READOUT_TARGETS[position]}: mean"),
            row=1, col=column,
        )
    return figure


def layer_dissociation_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """Form and knowledge per layer with that layer's write off, and with it alone on
    (`probe.dissociation.layer_dissociation`); dashed lines: the whole adapter and the base model."""
    panels = (("form_logprob", "form: log p(first response tokens)"), ("answer_logprob", "knowledge: log p(gold | frame)"))
    figure = make_subplots(rows=1, cols=2, subplot_titles=[label for _, label in panels])
    styles = {"off": "#e45756", "only": "#4c78a8"}
    for col, (measure, _) in enumerate(panels, start=1):
        for mode, colour in styles.items():
            rows = table[table["mode"] == mode]
            figure.add_trace(
                go.Scatter(x=rows["layer"], y=rows[measure], mode="lines+markers", name=f"{mode} (this layer)",
                           legendgroup=mode, showlegend=col == 1, line={"color": colour},
                           error_y={"array": rows[f"{measure}_se"], "visible": True}),
                row=1, col=col,
            )
        for mode, dash in (("all", "dash"), ("none", "dot")):
            value = float(table.loc[table["mode"] == mode, measure].iloc[0])
            figure.add_hline(y=value, line_dash=dash, annotation_text="adapter" if mode == "all" else "base", row=1, col=col)
    figure.update_xaxes(title_text="layer")
    return figure.update_layout(title=title)


def token_shift_figure(table: pd.DataFrame, title: str) -> go.Figure:
    """URIAL's token shift (`probe.shift.token_shift`): the share of each kind of token per run, and the share
    shifted at each position of the answer, a line per run."""
    per_run = shift_shares(table)
    per_position = shift_shares(table, by=("run", "position"))
    figure = make_subplots(rows=1, cols=2, subplot_titles=("share of tokens", "shifted share by position"))
    for shift in SHIFTS:
        figure.add_trace(go.Bar(x=per_run["run"], y=per_run[shift], name=shift, marker_color=SHIFT_COLOURS[shift]), row=1, col=1)
    for run, group in per_position.groupby("run", sort=False):
        figure.add_trace(go.Scatter(x=group["position"], y=group["shifted"], mode="lines", name=f"{run}: shifted"), row=1, col=2)
    figure.update_layout(barmode="stack", title=title)
    figure.update_xaxes(title_text="position in the answer", row=1, col=2)
    return figure
