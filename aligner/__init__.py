"""Aligner (Zhou et al. 2023): N global tokens shared by every layer, read through each layer's frozen
key/value projections and added through a zero-initialised per-head gate; on TransformerLens 4.

Every method the project trains and compares is an `Adapter` (aligner/adapter.py) with one file format;
`load_adapter` reads any of them.
"""

import lazy_loader

# Each public name is imported from its module on first use, as is each submodule (`aligner.adapter`): the command
# line's help then need not load torch and TransformerLens. The command line (`aligner.cli`) is no library: not here.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "adapter", "audit", "bank", "baselines", "chat", "checkpoint", "config", "data", "distributed",
        "dpo", "errors", "files", "generation", "layer", "lens", "loading", "methods", "model", "objective",
        "packaged", "paper", "recall", "registry", "runs", "stats", "suite", "tables", "tasks", "train",
    ],
    submod_attrs={
        "adapter": ["Adapter", "load_adapter"],
        "config": ["AlignerConfig", "ModelShape"],
        "dpo": ["DPOConfig", "train_dpo"],
        "generation": ["generate"],
        "loading": ["from_hf", "load_model", "model_fingerprint", "open_model", "tiny_model"],
        "model": ["Aligner"],
        "packaged": ["DEFAULT_MODEL"],
        "paper": ["import_paper_checkpoint"],
        "train": ["TrainConfig", "train_sft"],
    },
)
