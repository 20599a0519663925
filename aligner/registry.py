"""The names of methods, in one place: `aligner-4`, `adapter-1`, `lora-8`, `prompt-10`, `zbias`, `steering`,
`base`, `prompting`, `fewshot`, each turned into an adapter for a model and its family's learning rate.

A sized family is named FAMILY-SIZE (`aligner-4`: four prefix tokens; `aligner-28` on SmolLM2 holds as many
numbers as `adapter-1`, one token per adapted layer, shared instead); a trained method may change its factors
after colons (`aligner-1:lr=0.05`, `aligner-1:steps=40:train=10`, `aligner-1:gate_scale=0.5`). Without `lr=`
the suite chooses the rate on the validation loss, around the family's. Two controls are options too:
`aligner-1:tokens=random` trains `aligner-1`, then answers with its tokens replaced by random ones of the same
norms and its trained gates (is a change of the learned one's size, in any direction, enough to do what it
does?), and `METHOD:data=own` trains on the base model's own answers to the training prompts (what training
alone costs, with no new form to learn). `METHOD:then=dpo` trains `METHOD`, then DPO from it on the task's
preference pairs (the paper's value alignment). `base` (the base model in its own form), `prompting` (the task's
behaviour told in the system prompt), `fewshot` (answered training examples in the new form before each
question) and `steering` (contrastive activation addition, computed, not trained) have no size.
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
    kind: str  # "zero" (no parameters: base, prompting, fewshot), "steering" (computed), "trained"
    make: Callable[[nn.Module], Adapter] | None = None  # a fresh adapter for the model; reads torch's RNG
    family: str | None = None  # FAMILIES' or UNSIZED's key (trained methods): the rate's family
    # The factors a method name may change (`aligner-1:steps=40:train=10`); None: the sweep's own.
    lr: float | None = None  # AdamW's rate after warm-up (a `then=` method's: its last stage's); None: chosen on validation
    steps: int | None = None  # step budget
    train: int | None = None  # training items: the first this many of the task's training split
    gate_scale: float = 1.0  # every gate times this when answering (aligners): the aligner's strength
    tokens: str | None = None  # "random": answer with random tokens of the trained ones' norms (a control)
    data: str | None = None  # "own": train on the base model's own answers (a control)
    # "dpo": trained as the method without this option is, then by DPO on the task's preference pairs, from that
    # method as its reference and starting point (the paper's value alignment: SFT, then DPO).
    then: str | None = None
    first_lr: float | None = None  # the first stage's rate, as the suite chose it on validation; None: its family's

    @property
    def family_lr(self) -> float:
        """The family's rate: where the suite's search starts, and what `aligner train` uses unless told. DPO's is
        `DPO_LR_FACTOR` times it: it starts from the trained method and only has to move it a little."""
        return default_lr(self.family) * (DPO_LR_FACTOR if self.then == "dpo" else 1.0)

    def first_stage(self) -> "MethodSpec":
        """What a `then=` method trains first: its spec without the `then` option."""
        name = ":".join(part for part in self.name.split(":") if not part.startswith("then="))
        return replace(self, name=name, then=None, first_lr=None, lr=self.first_lr)


def sized(family: str, size: int) -> MethodSpec:
    return MethodSpec(f"{family}-{size}", "trained", lambda model: FAMILIES[family].make(model, size), family)


# The suite's grid: what `aligner sweep` runs by default. Any size of a sized family is a method too (`aligner-3`).
METHODS: dict[str, MethodSpec] = {
    "base": MethodSpec("base", "zero"),
    "prompting": MethodSpec("prompting", "zero"),
    "fewshot": MethodSpec("fewshot", "zero"),
    "steering": MethodSpec("steering", "steering"),
    **{spec.name: spec for spec in (sized("aligner", n) for n in (1, 2, 4, 10))},
    **{spec.name: spec for spec in (sized("adapter", n) for n in (1, 10))},
    **{spec.name: spec for spec in (sized("lora", r) for r in (1, 8))},
    "prompt-10": sized("prompt", 10),
    **{name: MethodSpec(name, "trained", lambda model, f=f: f.make(model, 0), name) for name, f in UNSIZED.items()},
}


def number(kind: type, zero_ok: bool = False) -> Callable[[str], float]:
    """A parser of a finite number of `kind`, > 0 (>= 0 where `zero_ok`)."""

    def parse(value: str) -> float:
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if not (math.isfinite(parsed) and (parsed > 0 or zero_ok and parsed == 0)):
            raise ValueError(f"must be finite and {'>= 0' if zero_ok else '> 0'}, got {value}")
        return parsed

    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(map(repr, choices))}, got {value!r}")
        return value

    return parse


# The options a method name may carry: each sets the MethodSpec field of its name, read by its parser. A variant
# is trained afresh with the same seed, so `aligner-1:gate_scale=0.5` answers with the gates of `aligner-1`, halved.
OPTIONS: dict[str, Callable[[str], Any]] = {
    "lr": number(float),
    "steps": number(int),
    "train": number(int),
    "gate_scale": number(float, zero_ok=True),  # a gate scale of 0 answers as the base model
    "tokens": one_of("random"),
    "data": one_of("own"),
    "then": one_of("dpo"),
}
DPO_LR_FACTOR = 0.1


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
        except ValueError as err:
            raise ValueError(f"{name!r}: {key} {err}") from None
    for key in ("gate_scale", "tokens"):
        if key in changes and family not in ("aligner", "adapter"):
            raise ValueError(f"{name!r}: {key} changes an aligner's gates or tokens; {base!r} has neither")
    if "then" in changes and "data" in changes:
        raise ValueError(f"{name!r}: data=own is a control of one training stage; a then= method has two")
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
