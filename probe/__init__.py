"""probe: what an aligner changes inside the model it is attached to, and what it leaves alone.

Activations with and without aligners (`collect`, kept on disk), linear probes with control tasks and transfer
(`LayerwiseProbe`, `evaluate_probe`), gate tables, interventions and curves (`gates`), the geometry of the
aligner's effect against the knowledge directions with a null (`layer_geometry`), 2-D maps (`embeddings`); the
analyses that the model report and the app both show (`analyses`: `probe_curves`, `geometry_table`, ...), their
figures (`figures`) and the report's verdict (`verdict`, its thresholds named there); the mechanism analyses
(`logit_lens`, `token_readout`, `layer_dissociation`, `token_shift`, on items from `form_items`); and the scripted reports
(`build_model_report`, `build_paper_report`; `probe report`, `probe paper-report`), also in memory for a notebook
(`report_on_model`, `report_on_checkpoints`, drawn with `Report.show`).
Built on `aligner`'s public API; `aligner` knows nothing of it.
"""

import importlib
from typing import Any

# Each public name and the module that defines it, imported on first use: the command line's help then need not
# load torch and TransformerLens.
_PUBLIC = {
    "Activations": "probe.collect",
    "LayerwiseProbe": "probe.probes",
    "ProbeDataset": "probe.dataset",
    "ablation_curves": "probe.gates",
    "activation_frame": "probe.analyses",
    "answers": "probe.gates",
    "behaviour": "probe.analyses",
    "build_model_report": "probe.model_report",
    "build_paper_report": "probe.paper_report",
    "collect": "probe.collect",
    "control_labels": "probe.probes",
    "evaluate_probe": "probe.probes",
    "evaluation_set": "probe.dataset",
    "form_items": "probe.dataset",
    "form_probe_curves": "probe.analyses",
    "form_scores": "probe.analyses",
    "gate_curves": "probe.analyses",
    "gate_heatmap": "probe.figures",
    "gate_profile": "probe.gates",
    "gate_scale_curve": "probe.gates",
    "gate_table": "probe.gates",
    "geometry_figure": "probe.figures",
    "geometry_table": "probe.analyses",
    "head_activity": "probe.gates",
    "head_effects": "probe.gates",
    "knowledge_dataset": "probe.dataset",
    "knowledge_directions": "probe.geometry",
    "knowledge_probe_curves": "probe.analyses",
    "layer_dissociation": "probe.dissociation",
    "layer_geometry": "probe.geometry",
    "logit_lens": "probe.lens",
    "overlap": "probe.geometry",
    "principal_angles": "probe.geometry",
    "probe_curves": "probe.analyses",
    "probe_figure": "probe.figures",
    "report_on_checkpoints": "probe.paper_report",
    "report_on_model": "probe.model_report",
    "token_readout": "probe.lens",
    "token_shift": "probe.shift",
    "training_form": "probe.dataset",
    "verdict": "probe.verdict",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
