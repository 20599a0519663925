"""The names of methods, in one place: `aligner-4`, `adapter-1`, `lora-8`, `prompt-10`, `zbias`, `steering`,
`base`, `prompting`, each turned into an adapter for a model and its default learning rate.

A sized family is named FAMILY-SIZE (`aligner-4`: four prefix tokens); a trained method may change its factors
after colons (`aligner-1:lr=0.05`, `aligner-1:steps=40:train=10`, `aligner-1:gate_scale=0.5`). `base` (the base
model in its own form), `prompting` (the task's behaviour told in the system prompt) and `steering` (contrastive
activation addition, computed, not trained) have no size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from torch import nn

from aligner.adapter import Adapter
from aligner.config import AlignerConfig
from aligner.methods import (
    LoRA,
    LoRAConfig,
    PromptTuning,
    PromptTuningConfig,
    ZBias,
    ZBiasConfig,
)
from aligner.model import Aligner


@dataclass(frozen=True)
class Family:
    """Adapters with a size, named FAMILY-SIZE."""

    counts: str  # what the size counts
    make: Callable[[nn.Module, int], Adapter]  # a fresh one of a size for a model; reads torch's RNG
    lr: float  # AdamW's rate after warm-up unless told


# The aligners' rate is the authors' (lit-llama's adapter fine-tuning); the paper gives none for the others, whose
# rates are peft's and prompt tuning's usual orders of magnitude for AdamW.
FAMILIES: dict[str, Family] = {
    "aligner": Family("prefix tokens", lambda model, n: Aligner.for_model(model, AlignerConfig(n_tokens=n)), 9e-3),
    "adapter": Family(
        "prefix tokens per layer", lambda model, n: Aligner.for_model(model, AlignerConfig(n, shared=False)), 9e-3
    ),
    "lora": Family("rank", lambda model, r: LoRA.for_model(model, LoRAConfig(r, float(r))), 2e-3),
    "prompt": Family("virtual tokens", lambda model, n: PromptTuning.for_model(model, PromptTuningConfig(n)), 1e-2),
}
# Adapters without a size, by name (their `Adapter.family`).
UNSIZED: dict[str, Family] = {"zbias": Family("", lambda model, _: ZBias.for_model(model, ZBiasConfig()), 1e-2)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "zero" (no parameters: base, prompting), "steering" (computed), "trained"
    make: Callable[[nn.Module], Adapter] | None = None  # a fresh adapter for the model; reads torch's RNG
    lr: float = 0.0  # AdamW's rate after warm-up (trained methods)
    # The factors a method name may change (`aligner-1:steps=40:train=10`); None: the sweep's own.
    steps: int | None = None  # step budget
    train: int | None = None  # training items: the first this many of the task's training split
    gate_scale: float = 1.0  # every gate times this when answering (aligners): the aligner's strength


def sized(family: str, size: int) -> MethodSpec:
    return MethodSpec(f"{family}-{size}", "trained", lambda model: FAMILIES[family].make(model, size), FAMILIES[family].lr)


# The suite's grid: what `aligner sweep` runs by default. Any size of a sized family is a method too (`aligner-3`).
METHODS: dict[str, MethodSpec] = {
    "base": MethodSpec("base", "zero"),
    "prompting": MethodSpec("prompting", "zero"),
    "steering": MethodSpec("steering", "steering"),
    **{spec.name: spec for spec in (sized("aligner", n) for n in (1, 2, 4, 10))},
    **{spec.name: spec for spec in (sized("adapter", n) for n in (1, 10))},
    **{spec.name: spec for spec in (sized("lora", r) for r in (1, 8))},
    "prompt-10": sized("prompt", 10),
    **{name: MethodSpec(name, "trained", lambda model, f=f: f.make(model, 0), f.lr) for name, f in UNSIZED.items()},
}


# The options a method name may carry: each sets the MethodSpec field of its name, read as this type. A variant
# is trained afresh with the same seed, so `aligner-1:gate_scale=0.5` answers with the gates of `aligner-1`, halved.
OPTIONS = {"lr": float, "steps": int, "train": int, "gate_scale": float}


def method_spec(name: str) -> MethodSpec:
    """The spec of `name`: "lora-8", or a trained method with factors changed, colon-separated:
    "aligner-1:lr=0.05", "aligner-1:steps=40:train=10", "aligner-1:gate_scale=0.5" (aligners only)."""
    base, *options = name.split(":")
    family, _, size = base.partition("-")
    if base in METHODS:
        spec = METHODS[base]
    elif family in FAMILIES and size.isdigit() and int(size) > 0:
        spec = sized(family, int(size))
    else:
        raise ValueError(
            f"no method {base!r}; choose from {', '.join(METHODS)}, or another size of {'-N, '.join(FAMILIES)}-N"
        )
    if options and spec.kind != "trained":
        raise ValueError(f"{name!r}: only a trained method takes options, and {base!r} is not trained")
    changes: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in OPTIONS:
            raise ValueError(f"{name!r}: no option {key!r}; the options are {', '.join(OPTIONS)}, as KEY=VALUE")
        if key in changes:
            raise ValueError(f"{name!r}: option {key!r} given twice")
        try:
            changes[key] = OPTIONS[key](value)
        except ValueError:
            kind = "an integer" if OPTIONS[key] is int else "a number"
            raise ValueError(f"{name!r}: {key} must be {kind}, got {value!r}") from None
        zero_ok = key == "gate_scale"  # a gate scale of 0 answers as the base model
        if not (math.isfinite(changes[key]) and (changes[key] > 0 or zero_ok and changes[key] == 0)):
            raise ValueError(f"{name!r}: {key} must be finite and {'>= 0' if zero_ok else '> 0'}, got {value}")
    if "gate_scale" in changes and family not in ("aligner", "adapter"):
        raise ValueError(f"{name!r}: gate_scale scales an aligner's gates; {base!r} has none")
    return replace(spec, name=name, **changes)


def trained_spec(name: str) -> MethodSpec:
    """The spec of a trained method without options: what `aligner train --method` and the app's Train tab make."""
    if ":" in name:
        raise ValueError(f"{name}: give the training options (the rate, the steps) as options of their own, not {name.partition(':')[2]!r}")
    spec = method_spec(name)
    if spec.kind != "trained":
        raise ValueError(f"{name!r} is not trained; choose aligner-N, adapter-N, lora-R, prompt-N or zbias")
    return spec


def default_lr(family: str) -> float:
    """The rate an adapter of `family` (`Adapter.family`: "aligner", "lora", "zbias", ...) trains at unless told."""
    known = FAMILIES | UNSIZED
    if family not in known:
        raise ValueError(f"no default learning rate for {family!r}; give one (TrainConfig.lr)")
    return known[family].lr


def method_order(name: str) -> tuple[int, int, str]:
    """Where `name` goes in a table: by family in METHODS' order, then size, variants after their method."""
    family, _, size = name.split(":")[0].partition("-")
    families = list(dict.fromkeys(m.partition("-")[0] for m in METHODS))
    return (families.index(family) if family in families else len(families), int(size) if size.isdigit() else 0, name)
