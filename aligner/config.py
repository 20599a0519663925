"""What a user sets for an aligner, and the shape of the model it belongs to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class AlignerConfig:
    n_tokens: int = 1  # N: prefix tokens that every adapted layer attends to
    start_layer: int = 2  # first adapted layer; the authors' code skips layers 0 and 1
    shared: bool = True  # True: one (N, d_model) prefix for all layers (Aligner); False: one per layer (LLaMA-Adapter v1)

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"AlignerConfig.n_tokens must be >= 1, got {self.n_tokens}")
        if self.start_layer < 0:
            raise ValueError(f"AlignerConfig.start_layer must be >= 0, got {self.start_layer}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "AlignerConfig":
        return cls(**_exact_fields(cls, data, source))


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of the base model that an aligner's tensors depend on."""

    d_model: int
    n_layers: int
    n_heads: int  # query heads: one gate per query head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model shape") -> "ModelShape":
        return cls(**_exact_fields(cls, data, source))


def _exact_fields(cls: type, data: Any, source: str) -> dict[str, Any]:
    """The dataclass fields of `data`, refusing missing, extra and mistyped ones by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object for {cls.__name__}, found {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    missing = sorted(set(names) - set(data))
    extra = sorted(set(data) - set(names))
    if missing or extra:
        raise ValueError(f"{source}: {cls.__name__} fields missing {missing}, unexpected {extra}")
    for name, value in data.items():
        expected = int if names[name].type == "int" else bool
        if type(value) is not expected:
            raise ValueError(
                f"{source}: field {name!r} must be {expected.__name__}, found {value!r} ({type(value).__name__})"
            )
    return data
