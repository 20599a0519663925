"""What a user sets for an aligner, and the shape of the model it belongs to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Collection, TypeVar

T = TypeVar("T")


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
        return from_json_object(cls, data, source)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of the base model that an adapter's tensors depend on."""

    d_model: int
    n_layers: int
    n_heads: int  # query heads: one gate per query head
    # Each head's width and the key/value heads (LoRA's and the z-bias's widths); None in files written before
    # they were recorded, whose tensors then give them. Gemma 3 270M: d_head 256, not d_model / n_heads.
    d_head: int | None = None
    n_kv_heads: int | None = None

    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("d_head", "n_kv_heads")

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", *self.LATER_FIELDS):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {value}")

    def mismatches(self, other: "ModelShape") -> list[tuple[str, int, int]]:
        """(field, self's, other's) for each dimension the two disagree on; one that either leaves unrecorded
        (None) is not compared."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if None not in (getattr(self, f.name), getattr(other, f.name))
            and getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model shape") -> "ModelShape":
        return from_json_object(cls, data, source)


# JSON value types by the annotation that names them; "int | None" allows either, "tuple[str, ...]" a list of
# strings. bool is not an int here.
JSON_TYPES = {"int": int, "bool": bool, "float": float, "str": str, "dict": dict, "list": list, "None": type(None)}


def json_matches(value: Any, annotation: str) -> bool:
    """Whether JSON `value` is of the type `annotation` names. An integer is a valid float in JSON ("lr": 1)."""
    for part in annotation.split("|"):
        part = part.strip()
        if part.startswith("tuple[") and part.endswith(", ...]"):
            if isinstance(value, list) and all(json_matches(v, part[6:-6]) for v in value):
                return True
        elif type(value) is JSON_TYPES[part] or (part == "float" and type(value) is int):
            return True
    return False


def check_fields(
    data: Any, spec: dict[str, str], source: str, kind: str, optional: Collection[str] = ()
) -> dict[str, Any]:
    """`data` if it is a JSON object with exactly the fields of `spec` (name -> annotation such as "int" or
    "str | None"), each of its type; `optional` fields may be absent. Errors name `source`, the field, and
    what was expected and found."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object ({kind}), found {type(data).__name__}")
    missing = sorted(set(spec) - set(data) - set(optional))
    extra = sorted(set(data) - set(spec))
    if missing or extra:
        raise ValueError(
            f"{source}: {kind} fields missing {missing}, unexpected {extra} (expected the fields {sorted(spec)})"
        )
    for name, value in data.items():
        if not json_matches(value, spec[name]):
            raise ValueError(
                f"{source}: field {name!r} must be {spec[name]}, found {short_repr(value)} ({type(value).__name__})"
            )
    return data


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a message quotes what it found without pasting a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataclass_spec(cls: type) -> dict[str, str]:
    """The `check_fields` spec of a dataclass: its fields and their annotations."""
    return {f.name: f.type for f in fields(cls)}


def from_json_object(cls: type[T], data: Any, source: str) -> T:
    """Dataclass `cls` from a JSON object with exactly its fields (those in its `LATER_FIELDS` may be absent, and
    take their defaults); its own checks' errors also name `source`."""
    values = check_fields(data, dataclass_spec(cls), source, cls.__name__, getattr(cls, "LATER_FIELDS", ()))
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from err
