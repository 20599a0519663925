"""Aligner (Zhou et al. 2023): N global tokens shared by every layer, read through each layer's frozen
key/value projections and added through a zero-initialised per-head gate; on TransformerLens 4.

Every method the project trains and compares is an `Adapter` (aligner/adapter.py) with one file format;
`load_adapter` reads any of them.
"""

import importlib
from typing import Any

# Each public name and the module that defines it, imported on first use: `import aligner.config` (and the
# command line's help) then need not load torch and TransformerLens.
_PUBLIC = {
    "DEFAULT_MODEL": "aligner.packaged",
    "Adapter": "aligner.adapter",
    "Aligner": "aligner.model",
    "AlignerConfig": "aligner.config",
    "DPOConfig": "aligner.dpo",
    "ModelShape": "aligner.config",
    "TrainConfig": "aligner.train",
    "from_hf": "aligner.loading",
    "generate": "aligner.generation",
    "import_paper_checkpoint": "aligner.paper",
    "load_adapter": "aligner.adapter",
    "load_model": "aligner.loading",
    "model_fingerprint": "aligner.loading",
    "open_model": "aligner.loading",
    "tiny_model": "aligner.loading",
    "train_dpo": "aligner.dpo",
    "train_sft": "aligner.train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """A public name (`aligner.Aligner`) or a submodule (`aligner.loading`), imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":  # a module that this one imports is missing: say so
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
