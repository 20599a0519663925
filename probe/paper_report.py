"""The gate and token report of the authors' released aligners (`probe paper-report`): no base model needed.

Each checkpoint is read with `aligner.import_paper_checkpoint`; its task, base size and token count come from
its file name (`TASK-llama2-SIZE-Ntoken.pth`, as in ../shared/paper_aligners/README.md). Compared: gate
heatmaps (layers × heads), per-layer gate magnitude profiles on a relative-depth axis (so that 7B's 32 layers
and 13B's 40 line up) across tasks, sizes and token counts, the correlation of those profiles, token norms and
cosine similarities, and a PCA of the tokens of the checkpoints that share a width.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px

from aligner import Aligner, import_paper_checkpoint
from probe.embeddings import token_frame
from probe.figures import gate_heatmap
from probe.gates import gate_profile, gate_table
from probe.progress import steps
from probe.report import Report

NAME = re.compile(r"(?P<task>.+)-llama2-(?P<size>\d+b)-(?P<tokens>\d+)token")
# Comparisons of gate profiles: title -> which checkpoints (by their parsed fields).
COMPARISONS = {
    "tasks (LLaMA-2 7B, 1 token)": lambda c: c["size"] == "7b" and c["tokens"] == 1,
    "model size (Alpaca SFT, 1 token)": lambda c: c["task"] == "alpaca-sft" and c["tokens"] == 1,
    "token count (MetaMath SFT, 7B)": lambda c: c["task"] == "metamath-sft" and c["size"] == "7b",
}
DEPTH_GRID = np.linspace(0.0, 1.0, 101)  # profiles are interpolated onto it to be correlated across depths
THIRDS = ("early", "middle", "late")


def load_checkpoints(directory: str | Path) -> tuple[dict[str, Aligner], pd.DataFrame]:
    """Every `*.pth` in `directory` as an Aligner, and a table of what each is (task, size, tokens, shape)."""
    aligners, rows = {}, []
    for path in steps(sorted(Path(directory).glob("*.pth")), "checkpoints", unit="file"):
        al = import_paper_checkpoint(path)
        match = NAME.fullmatch(path.stem)
        fields = match.groupdict() if match else {"task": path.stem, "size": None, "tokens": al.config.n_tokens}
        aligners[path.stem] = al
        rows.append(
            {
                "checkpoint": path.stem, "task": fields["task"], "size": fields["size"], "tokens": int(fields["tokens"]),
                "d_model": al.shape.d_model, "n_layers": al.shape.n_layers, "n_heads": al.shape.n_heads,
                "start_layer": al.config.start_layer, "parameters": al.num_parameters(),
            }
        )
    if not rows:
        raise FileNotFoundError(f"{directory}: no .pth checkpoints")
    return aligners, pd.DataFrame(rows)


def gate_summary(al: Aligner) -> dict[str, float]:
    """One checkpoint's gates and tokens in numbers: |g| mean and max, the layer of the largest mean |g|, the
    share of sum |g| in each third of the adapted layers, the share of negative gates, the tokens' mean norm
    and (N > 1) their mean pairwise cosine similarity."""
    table, profile = gate_table(al), gate_profile(al)
    thirds = np.array_split(profile["mean_abs"].to_numpy(), 3)
    total = profile["mean_abs"].sum()
    tokens = al.tokens.detach().float().numpy().reshape(-1, al.shape.d_model)
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    cosines = (unit @ unit.T)[np.triu_indices(len(unit), 1)]
    return {
        "mean_abs_gate": float(table["abs_gate"].mean()),
        "max_abs_gate": float(table["abs_gate"].max()),
        "peak_layer": int(profile.loc[profile["mean_abs"].idxmax(), "layer"]),
        **{f"share_{name}": float(third.sum() / total) for name, third in zip(THIRDS, thirds)},
        "negative_share": float((table["gate"] < 0).mean()),
        "token_norm": float(np.linalg.norm(tokens, axis=1).mean()),
        "token_pairwise_cosine": float(cosines.mean()) if len(cosines) else float("nan"),
    }


def profile_correlations(aligners: dict[str, Aligner]) -> pd.DataFrame:
    """Pearson correlation of every two checkpoints' mean-|gate| profiles on the common relative-depth grid
    (each profile interpolated over the depths it covers)."""
    curves = {}
    for name, al in aligners.items():
        profile = gate_profile(al)
        curves[name] = np.interp(DEPTH_GRID, profile["depth"], profile["mean_abs"])
    covered = DEPTH_GRID >= max(gate_profile(al)["depth"].min() for al in aligners.values())
    return pd.DataFrame({name: curve[covered] for name, curve in curves.items()}).corr()


def token_cosines(aligners: dict[str, Aligner]) -> pd.DataFrame:
    """Cosine similarity of the mean token of every two checkpoints of the same width (NaN across widths)."""
    means = {name: al.tokens.detach().float().numpy().reshape(-1, al.shape.d_model).mean(axis=0) for name, al in aligners.items()}
    names = list(means)
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for a, b in itertools.product(names, names):
        if means[a].shape == means[b].shape:
            matrix.loc[a, b] = float(means[a] @ means[b] / (np.linalg.norm(means[a]) * np.linalg.norm(means[b])))
    return matrix


def change(reference: Aligner, tuned: Aligner) -> dict[str, float]:
    """How far `tuned` moved from `reference` (a DPO aligner from its SFT starting point): the largest and mean
    |gate change| next to the reference's mean |gate|, and the tokens' relative change |ΔP| / |P|."""
    delta = (tuned.gates - reference.gates).detach().abs()
    tokens, reference_tokens = tuned.tokens.detach(), reference.tokens.detach()
    return {
        "max_abs_gate_change": float(delta.max()),
        "mean_abs_gate_change": float(delta.mean()),
        "reference_mean_abs_gate": float(reference.gates.detach().abs().mean()),
        "relative_token_change": float((tokens - reference_tokens).norm() / reference_tokens.norm()),
    }


def preference_pairs(info: pd.DataFrame) -> list[tuple[str, str]]:
    """(SFT reference, DPO checkpoint) pairs: a "-dpo" task and an SFT task of the same data set, size and N."""
    pairs = []
    for tuned in info.itertuples():
        if tuned.task.endswith("-dpo"):
            data = tuned.task.removesuffix("-dpo")
            for ref in info.itertuples():
                same = (ref.size, ref.tokens) == (tuned.size, tuned.tokens)
                if same and ref.task.startswith(data) and ref.task.endswith("sft"):
                    pairs.append((ref.checkpoint, tuned.checkpoint))
    return pairs


def build_paper_report(directory: str | Path, out: str | Path) -> dict[str, Path]:
    """Write report.html, metrics.json and summary.md about the checkpoints in `directory` into `out`."""
    report = report_on_checkpoints(directory)
    return report.write(out, paper_summary(report))


def report_on_checkpoints(directory: str | Path) -> Report:
    """The report on the checkpoints in `directory`, in memory: its sections (`Report.show` draws them in a
    notebook) and metrics; `build_paper_report` writes it out."""
    aligners, info = load_checkpoints(directory)
    summary_rows = pd.DataFrame([{"checkpoint": name, **gate_summary(al)} for name, al in aligners.items()])
    info = info.merge(summary_rows, on="checkpoint")
    report = Report("Aligner gates and tokens of the paper's released checkpoints")

    overview = report.section("checkpoints", "The checkpoints")
    overview.text(
        f"{len(info)} checkpoints from {directory}, read with aligner.import_paper_checkpoint (weights_only). Gates are "
        "per layer and head; share_early/middle/late: the share of the summed per-layer mean |gate| in each third of "
        "the adapted layers; negative_share: the share of gates below zero; token_pairwise_cosine: the mean cosine "
        "between a checkpoint's own tokens (N > 1)."
    )
    overview.table(info)
    report.metrics["checkpoints"] = info

    heatmaps = report.section("heatmaps", "Gate heatmaps (layers × heads)")
    heatmaps.text("Signed gates; each checkpoint on its own colour scale, centred on zero.")
    for name, al in aligners.items():
        heatmaps.figure(gate_heatmap(al, name))

    profiles = report.section("profiles", "Per-layer gate magnitude profiles")
    profiles.text(
        "Mean |gate| over a layer's heads against the layer's relative depth, layer / (n_layers - 1), for three "
        "comparisons: tasks at one size and token count, the two sizes, and the token counts."
    )
    all_profiles = pd.concat([gate_profile(al).assign(checkpoint=name) for name, al in aligners.items()])
    for title, chosen in COMPARISONS.items():
        names = [row["checkpoint"] for row in info.to_dict("records") if chosen(row)]
        if names:
            frame = all_profiles[all_profiles.checkpoint.isin(names)]
            profiles.figure(px.line(frame, x="depth", y="mean_abs", color="checkpoint", markers=True, title=title))
    correlations = profile_correlations(aligners)
    profiles.figure(px.imshow(correlations, zmin=-1, zmax=1, color_continuous_scale="RdBu_r", title="Profile correlation (Pearson)"))
    profiles.table(correlations.round(3).reset_index(names="checkpoint"), "Pearson correlation of the mean-|gate| profiles.")
    report.metrics["profiles"] = {"per_layer": all_profiles, "correlation": correlations.reset_index(names="checkpoint")}

    tokens = report.section("tokens", "Tokens: norms, cosine similarities, PCA")
    norms = pd.concat(
        [
            pd.DataFrame({"checkpoint": name, "norm": np.linalg.norm(al.tokens.detach().float().numpy().reshape(-1, al.shape.d_model), axis=1)})
            for name, al in aligners.items()
        ]
    )
    tokens.figure(px.box(norms, x="checkpoint", y="norm", points="all", title="Token norms"))
    cosines = token_cosines(aligners)
    tokens.figure(px.imshow(cosines, zmin=-1, zmax=1, color_continuous_scale="RdBu_r", title="Cosine similarity of mean tokens (same width only)"))
    tokens.table(cosines.round(3).reset_index(names="checkpoint"), "Cosine similarity of each checkpoint's mean token; empty across widths.")
    changes = {f"{tuned} from {ref}": change(aligners[ref], aligners[tuned]) for ref, tuned in preference_pairs(info)}
    if changes:
        tokens.table(
            pd.DataFrame(changes).T.reset_index(names="pair"),
            "How far each DPO aligner moved from the SFT aligner it started from.",
        )
    report.metrics["tokens"] = {"cosine_of_mean_tokens": cosines.reset_index(names="checkpoint"), "dpo_change": changes}
    for width, group in info.groupby("d_model"):
        members = {name: aligners[name] for name in group["checkpoint"]}
        frame = token_frame(members)
        tokens.figure(px.scatter(frame, x="x", y="y", color="run", hover_data=["slot", "norm"], title=f"PCA of the tokens, d_model = {width}"))
        report.metrics["tokens"][f"pca_{width}"] = frame

    return report


def paper_summary(report: Report) -> str:
    """summary.md: what the numbers show, each with the section it comes from."""
    info = report.metrics["checkpoints"]
    correlations = report.metrics["profiles"]["correlation"].set_index("checkpoint")
    changes = report.metrics["tokens"]["dpo_change"]
    by_name = info.set_index("checkpoint")
    late, early = by_name.share_late, by_name.share_early
    lines = [f"# {report.title}", ""]
    lines.append(
        f"In every checkpoint the late third of the adapted layers holds more of the gate magnitude "
        f"({late.min():.0%}-{late.max():.0%}) than the early third ({early.min():.0%}-{early.max():.0%})."
        if (late > early).all()
        else f"The late third of the adapted layers holds {late.min():.0%}-{late.max():.0%} of the gate magnitude, "
        f"the early third {early.min():.0%}-{early.max():.0%}."
    )
    lines.append("")
    lines.append(f"Checkpoints ({report.ref('checkpoints')}):")
    for name, row in by_name.iterrows():
        third = max(THIRDS, key=lambda t: row[f"share_{t}"])
        lines.append(
            f"- {name}: mean |g| {row.mean_abs_gate:.3f}, max |g| {row.max_abs_gate:.3f}, largest mean |g| at layer "
            f"{row.peak_layer} (layers {row.start_layer}-{row.n_layers - 1} adapted); {row[f'share_{third}']:.0%} of the gate magnitude in the {third} third of the adapted "
            f"layers; {row.negative_share:.0%} of gates negative; token norm {row.token_norm:.2f}"
        )
    lines += ["", f"Comparisons ({report.ref('profiles')}, {report.ref('tokens')}):"]
    for title, chosen in COMPARISONS.items():
        names = [row["checkpoint"] for row in info.to_dict("records") if chosen(row)]
        pairs = list(itertools.combinations(names, 2))
        if pairs:
            values = ", ".join(f"{a} vs {b} r = {correlations.loc[a, b]:.2f}" for a, b in pairs)
            lines.append(f"- Gate profiles across {title}: {values}.")
    for ref, tuned in preference_pairs(info):
        moved = changes[f"{tuned} from {ref}"]
        lines.append(
            f"- {tuned} against its SFT start {ref}: profile r = {correlations.loc[ref, tuned]:.3f}; gates moved by "
            f"{moved['mean_abs_gate_change']:.4f} on average (max {moved['max_abs_gate_change']:.4f}) against a mean "
            f"|g| of {moved['reference_mean_abs_gate']:.4f}; tokens moved by {moved['relative_token_change']:.2%} of their norm."
        )
    by_tokens = by_name[by_name.task == "metamath-sft"].sort_values("tokens")
    if len(by_tokens) > 1:
        trend = ", ".join(f"N={row.tokens}: {row.mean_abs_gate:.3f}" for _, row in by_tokens.iterrows())
        rising = "rises with every step up in N" if (np.diff(by_tokens.mean_abs_gate) > 0).all() else "does not rise steadily with N"
        lines.append(f"- Mean |g| by token count (MetaMath SFT) {rising}: {trend}.")
    lines += ["", "All numbers: metrics.json (checkpoints, profiles, tokens); figures: report.html."]
    return "\n".join(lines) + "\n"
