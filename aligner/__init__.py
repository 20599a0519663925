"""Aligner (Zhou et al. 2023): N global tokens shared by every layer, read through each layer's frozen
key/value projections and added through a zero-initialised per-head gate; on TransformerLens 4.

Every method the project trains and compares is an `Adapter` (aligner/adapter.py) with one file format;
`load_adapter` reads any of them.
"""

from aligner.adapter import Adapter, load_adapter
from aligner.config import AlignerConfig, ModelShape
from aligner.dpo import DPOConfig, train_dpo
from aligner.generation import generate
from aligner.loading import (
    DEFAULT_MODEL,
    from_hf,
    load_model,
    model_fingerprint,
    open_model,
    tiny_model,
)
from aligner.model import Aligner
from aligner.paper import import_paper_checkpoint
from aligner.train import TrainConfig, train_sft

__all__ = [
    "DEFAULT_MODEL",
    "Adapter",
    "Aligner",
    "AlignerConfig",
    "DPOConfig",
    "ModelShape",
    "TrainConfig",
    "from_hf",
    "generate",
    "import_paper_checkpoint",
    "load_adapter",
    "load_model",
    "model_fingerprint",
    "open_model",
    "tiny_model",
    "train_dpo",
    "train_sft",
]
