"""probe: what an aligner changes inside the model it is attached to, and what it leaves alone.

Activations with and without aligners (`collect`, kept on disk), linear probes with control tasks and transfer
(`LayerwiseProbe`, `evaluate_probe`), gate tables, interventions and curves (`gates`), the geometry of the
aligner's effect against the knowledge directions with a null (`layer_geometry`), 2-D maps (`embeddings`); the
analyses that the model report and the app both show (`analyses`: `probe_curves`, `geometry_table`, ...), their
figures (`figures`) and the report's verdict (`verdict`, its thresholds named there); and the scripted reports
(`build_model_report`, `build_paper_report`; `probe report`, `probe paper-report`), also in memory for a notebook
(`report_on_model`, `report_on_checkpoints`, drawn with `Report.show`).
Built on `aligner`'s public API; `aligner` knows nothing of it.
"""

from probe.analyses import (
    activation_frame,
    behaviour,
    form_probe_curves,
    form_scores,
    gate_curves,
    geometry_table,
    knowledge_probe_curves,
    probe_curves,
)
from probe.collect import Activations, collect
from probe.dataset import ProbeDataset, evaluation_set, knowledge_dataset, training_form
from probe.figures import gate_heatmap, geometry_figure, probe_figure
from probe.gates import (
    ablation_curves,
    answers,
    gate_profile,
    gate_scale_curve,
    gate_table,
    head_activity,
    head_effects,
)
from probe.geometry import (
    knowledge_directions,
    layer_geometry,
    overlap,
    principal_angles,
)
from probe.model_report import build_model_report, report_on_model
from probe.paper_report import build_paper_report, report_on_checkpoints
from probe.probes import LayerwiseProbe, control_labels, evaluate_probe
from probe.verdict import verdict

__all__ = [
    "Activations",
    "LayerwiseProbe",
    "ProbeDataset",
    "ablation_curves",
    "activation_frame",
    "answers",
    "behaviour",
    "build_model_report",
    "build_paper_report",
    "collect",
    "control_labels",
    "evaluate_probe",
    "evaluation_set",
    "form_probe_curves",
    "form_scores",
    "gate_curves",
    "gate_heatmap",
    "gate_profile",
    "gate_scale_curve",
    "gate_table",
    "geometry_figure",
    "geometry_table",
    "head_activity",
    "head_effects",
    "knowledge_dataset",
    "knowledge_directions",
    "knowledge_probe_curves",
    "layer_geometry",
    "overlap",
    "principal_angles",
    "probe_curves",
    "probe_figure",
    "report_on_checkpoints",
    "report_on_model",
    "training_form",
    "verdict",
]
