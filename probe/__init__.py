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

import lazy_loader

# Each public name is imported from its module on first use, as is each submodule (`probe.analyses`): the command
# line's help then need not load torch and TransformerLens. `probe.collect` and `probe.verdict` are the functions
# (their modules are imported as such); the command line (`probe.cli`) is no library: not here.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "analyses", "dataset", "demo", "dissociation", "embeddings", "explore", "figures",
        "gates", "geometry", "lens", "mechanism_figures", "mechanism_report", "model_report",
        "paper_report", "probes", "progress", "report", "shift",
    ],
    submod_attrs={
        "analyses": [
            "activation_frame", "behaviour", "form_probe_curves", "form_scores", "gate_curves", "geometry_table",
            "knowledge_probe_curves", "probe_curves",
        ],
        "collect": ["Activations", "collect"],
        "dataset": ["ProbeDataset", "evaluation_set", "form_items", "knowledge_dataset", "training_form"],
        "dissociation": ["layer_dissociation"],
        "figures": ["gate_heatmap", "geometry_figure", "probe_figure"],
        "gates": [
            "ablation_curves", "answers", "gate_profile", "gate_scale_curve", "gate_table", "head_activity",
            "head_effects",
        ],
        "geometry": ["knowledge_directions", "layer_geometry", "overlap", "principal_angles"],
        "lens": ["logit_lens", "token_readout"],
        "model_report": ["build_model_report", "report_on_model"],
        "paper_report": ["build_paper_report", "report_on_checkpoints"],
        "probes": ["LayerwiseProbe", "control_labels", "evaluate_probe"],
        "shift": ["token_shift"],
        "verdict": ["verdict"],
    },
)
