"""The other adapters the suite compares with the Aligner (model.py; `shared=False` is LLaMA-Adapter), each an
`aligner.adapter.Adapter` with the same attach, files and training:

    LoRA            W + (alpha / r) B A on chosen projections (q and v, as in the LoRA and Aligner papers),
                    peft's LoRA layer swapped into the bridge's linear components (or the plain model's
                    projections) while attached
    PromptTuning    N learned input embeddings, peft's prompt embedding, in front of the user's turn
    ZBias           z[l, h] <- z[l, h] + b[l, h], a learned constant on each head's output of each adapted layer
    SteeringVector  resid[l] <- resid[l] + m v, a fixed vector on one layer's residual input (nothing trained:
                    baselines.fit_steering computes it)

N = 1 makes the aligner's prefix softmax a single slot (always 1), so a one-token aligner adds the constant
g[l, h] * (W_V^l P + b_V^l) to every position of head h of layer l: a `ZBias` whose per-layer vectors are tied
through the one token P. `one_token_aligner_as_bias` writes that out (tests check the logits agree).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Collection, Iterator

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformers import PreTrainedTokenizerBase

from aligner.adapter import Adapter, TensorShapes, saved_kind, shape_of
from aligner.chat import prompt_ids
from aligner.config import ModelShape
from aligner.lens import is_bridge, swap_projection, wrapped
from aligner.model import Aligner, decoder_attentions, projection

# ---- LoRA (through peft) ----

LORA_TARGETS = ("q", "k", "v", "o")  # the bridge's names of the attention projections


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of each update
    alpha: float = 8.0  # the update is scaled by alpha / r (peft's lora_alpha); alpha = r: scale 1
    targets: tuple[str, ...] = ("q", "v")  # attention projections adapted in every layer (bridge names q, k, v, o)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a list when read back from JSON
        if self.r < 1:
            raise ValueError(f"LoRAConfig.r must be >= 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be finite and > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRAConfig.targets must be distinct names among {LORA_TARGETS}, got {list(self.targets)}")


@saved_kind
class LoRA(Adapter):
    """Low-rank updates W + (alpha / r) B A of chosen attention projections (Hu et al. 2021), each computed by
    peft's `lora.Linear`. The A and B matrices are this module's; while attached, each target's
    `LinearBridge` (on a plain transformers model: the projection's place in its attention module) holds a peft
    layer around the base projection, holding these A and B, and afterwards the base projection alone again, so
    the same frozen model serves every adapter. Initialised as peft does: A Kaiming-uniform, B zero (an untrained
    LoRA changes nothing)."""

    kind = "lora"
    config_type = LoRAConfig
    runs_on_plain_model: ClassVar[bool] = True  # peft's layer in place of the projection itself

    def __init__(self, config: LoRAConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []  # (holder, projection's name, base projection)

    @classmethod
    def tensor_shapes(cls, config: LoRAConfig, shape: ModelShape) -> TensorShapes:
        """lora_A.{layer}_{target}.weight (r, in) and lora_B.{...}.weight (out, r) of each layer and target; a
        width the shape does not record (files without d_head) is any."""
        width = {"q": shape.n_heads, "o": shape.n_heads, "k": shape.n_kv_heads, "v": shape.n_kv_heads}
        shapes: TensorShapes = {}
        for layer in range(shape.n_layers):
            for target in config.targets:
                heads = None if width[target] is None or shape.d_head is None else width[target] * shape.d_head
                n_in, n_out = (heads, shape.d_model) if target == "o" else (shape.d_model, heads)
                shapes[f"lora_A.{layer}_{target}.weight"] = (config.r, n_in)
                shapes[f"lora_B.{layer}_{target}.weight"] = (n_out, config.r)
        return shapes

    @classmethod
    def empty(cls, config: LoRAConfig, shape: ModelShape, base_model: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "LoRA":
        lora = cls(config, shape, base_model)
        for name in cls.tensor_shapes(config, shape):  # in `initialise`'s order, which the optimizer's state follows
            matrices, key, _ = name.split(".")
            n_out, n_in = shapes[name]
            getattr(lora, matrices)[key] = nn.Linear(n_in, n_out, bias=False)
        return lora

    def initialise(self, model: nn.Module) -> None:
        for key, holder, name in self._targets(model):
            base = wrapped(getattr(holder, name))
            self.lora_A[key] = nn.Linear(base.in_features, self.config.r, bias=False)  # Kaiming-uniform, as peft
            self.lora_B[key] = nn.Linear(self.config.r, base.out_features, bias=False)
            nn.init.zeros_(self.lora_B[key].weight)

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(key, holder, name) of each adapted projection: on a bridge, block l's attention component and its
        linear component (q, k, v, o); on a transformers model, layer l's attention module and its projection
        (q_proj, ...)."""
        if is_bridge(model):
            attentions = [(model.blocks[layer].attn, "{}") for layer in range(self.shape.n_layers)]
        else:
            attentions = [(attn, "{}_proj") for _, attn in decoder_attentions(model)]
        return [
            (f"{layer}_{target}", attn, name.format(target))
            for layer, (attn, name) in enumerate(attentions)
            for target in self.config.targets
        ]

    def hook_into(self, model: nn.Module) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        targets = self._targets(model)
        for key, holder, name in targets:  # every width checked before any projection is wrapped
            base = wrapped(getattr(holder, name))
            have = (self.lora_A[key].in_features, self.lora_B[key].out_features)
            if have != (base.in_features, base.out_features):
                raise ValueError(
                    f"LoRA matrices of blocks.{key.replace('_', '.attn.')} map {have[0]} to {have[1]} features; "
                    f"the model's projection maps {base.in_features} to {base.out_features}"
                )
        peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, target_modules=list(self.config.targets))
        for key, holder, name in targets:
            base = wrapped(getattr(holder, name))
            with torch.random.fork_rng(devices=[]):  # peft initialises A and B, which are replaced at once
                wrapper = PeftLoraLinear(base, "default", config=peft_config, r=self.config.r, lora_alpha=self.config.alpha)
            wrapper.lora_A["default"] = self.lora_A[key]
            wrapper.lora_B["default"] = self.lora_B[key]
            swap_projection(holder, name, wrapper)
            self._wrapped.append((holder, name, base))

    def unhook(self, model: nn.Module) -> None:
        for holder, name, base in self._wrapped:
            swap_projection(holder, name, base)
        self._wrapped = []

    @property
    def switchable_layers(self) -> list[int]:
        return list(range(self.shape.n_layers))

    @contextlib.contextmanager
    def switched_off(self, layers: Collection[int]) -> Iterator[None]:
        """What its B matrices of `layers` add is zero: peft computes W x + (alpha / r) B A x, so the update is
        exactly gone there and the base projection is left."""
        def zero(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(out)

        handles = [self.lora_B[f"{layer}_{target}"].register_forward_hook(zero) for layer in layers for target in self.config.targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# ---- prompt tuning (through peft) ----


@dataclass(frozen=True)
class PromptTuningConfig:
    n_tokens: int = 10  # virtual tokens
    # The special token that marks each virtual token's slot in a prompt; None: the model's own (`placeholder_for`),
    # chosen by `PromptTuning.for_model` and saved with the method.
    placeholder: str | None = None


def placeholder_problem(tokenizer: PreTrainedTokenizerBase, placeholder: str) -> str | None:
    """Why `placeholder` cannot mark prompt tuning's slots for `tokenizer`, or None where it can. It must be one
    token of its own, and one that nothing else puts in a prompt: not the tokens that pad, begin or end a sequence
    (padding would add slots to a row, and left padding would move the count along it), nor one the chat template
    writes."""
    ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return f"it is {len(ids)} tokens of this tokenizer, not one"
    roles = {
        "pad": tokenizer.pad_token_id,
        "beginning-of-sequence": tokenizer.bos_token_id,
        "end-of-sequence": tokenizer.eos_token_id,
    }
    taken = [role for role, token in roles.items() if token == ids[0]]
    if taken:
        return f"it is the tokenizer's {taken[0]} token"
    if ids[0] in prompt_ids(tokenizer, "Hi"):
        return "the chat template writes it"
    return None


def placeholder_for(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token that marks prompt tuning's slots for `tokenizer`: its unknown token (SmolLM2's
    `<|endoftext|>`, Gemma 3's `<unk>`), else `<|endoftext|>`, else its first other special token by id,
    the first of them that `placeholder_problem` lets through. Its embedding is never read: the hook replaces it."""
    specials = [token.content for _, token in sorted(tokenizer.added_tokens_decoder.items()) if token.special]
    for candidate in dict.fromkeys([tokenizer.unk_token, "<|endoftext|>", *specials]):
        if candidate is not None and placeholder_problem(tokenizer, candidate) is None:
            return candidate
    raise ValueError(
        f"{type(tokenizer).__name__} ({tokenizer.name_or_path}) has no special token free to mark prompt tuning's "
        "slots: each one pads, begins or ends a sequence, is written by the chat template, or is not one token. "
        "Name one in PromptTuningConfig(placeholder=...)"
    )


@saved_kind
class PromptTuning(Adapter):
    """N learned input embeddings (Lester et al. 2021), held in peft's `PromptEmbedding` and initialised from the
    embeddings of random vocabulary tokens (peft's SAMPLE_VOCAB). peft prepends them to the whole input; here they
    sit at the start of the user's turn: `format_prompt` puts N placeholder tokens there (a special token of the
    model's that nothing else puts in a prompt: `placeholder_for`), and a hook on `hook_embed` puts the learned
    embeddings in their place. Positions, padding and the KV cache are then the bridge's own, so generation needs
    nothing else."""

    kind = "prompt-tuning"
    family = "prompt"
    config_type = PromptTuningConfig

    def __init__(self, config: PromptTuningConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        self.prompt = self._peft_embedding(None, init="RANDOM")
        self._input_ids: torch.Tensor | None = None

    def _peft_embedding(self, word_embeddings: nn.Module | None, init: str) -> nn.Module:
        from peft import PromptTuningConfig as PeftPromptTuningConfig
        from peft.tuners.prompt_tuning import PromptEmbedding

        config = PeftPromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.config.n_tokens,
            token_dim=self.shape.d_model,
            num_transformer_submodules=1,
            prompt_tuning_init=init,
        )
        return PromptEmbedding(config, word_embeddings)

    def initialise(self, model: nn.Module) -> None:
        if self.config.placeholder is None:
            self.config = replace(self.config, placeholder=placeholder_for(model.tokenizer))
        self.prompt = self._peft_embedding(wrapped(model.embed), init="SAMPLE_VOCAB")

    @classmethod
    def tensor_shapes(cls, config: PromptTuningConfig, shape: ModelShape) -> TensorShapes:
        return {"prompt.embedding.weight": (config.n_tokens, shape.d_model)}

    def format_prompt(self, prompt: str) -> str:
        if self.config.placeholder is None:
            raise ValueError(
                "this prompt tuning has no placeholder yet: make it with PromptTuning.for_model(model, config), "
                "which chooses the model's, or name one in PromptTuningConfig(placeholder=...)"
            )
        return self.config.placeholder * self.config.n_tokens + prompt

    def hook_into(self, model: nn.Module) -> None:
        placeholder = self.config.placeholder
        problem = "none was chosen" if placeholder is None else placeholder_problem(model.tokenizer, placeholder)
        if problem is not None:
            raise ValueError(
                f"prompt tuning's placeholder {placeholder!r} cannot mark its slots on {model.cfg.model_name}: "
                f"{problem}. A prompt tuning made by PromptTuning.for_model(model, config) has the model's own "
                "(aligner.methods.placeholder_for)"
            )
        (placeholder_id,) = model.tokenizer(placeholder, add_special_tokens=False)["input_ids"]

        def keep_ids(ids: torch.Tensor, hook: HookPoint) -> None:
            self._input_ids = ids
            if ids.shape[-1] > 1:  # a prompt, not a decoding step: each row must hold its N slots
                n, counts = self.config.n_tokens, (ids == placeholder_id).sum(dim=-1).tolist()
                wrong = [(row, c) for row, c in enumerate(counts) if c != n]
                if wrong:
                    row, count = wrong[0]
                    raise ValueError(
                        f"prompt tuning reads {n} placeholder tokens {placeholder!r} at the start of "
                        f"the user's turn; row {row} of the input holds {count}. Format each prompt once with "
                        "`aligner.objective.prompts_for` (train_sft, train_dpo and generation.answer do)"
                    )

        def insert(embeddings: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, d_model)
            # The k-th slot of a row reads virtual token k; no padding holds the placeholder, so the count starts at the
            # row's slots whatever the padding. A decoding step after the prompt holds none, and keeps its embedding.
            slots = self._input_ids == placeholder_id  # (B, T)
            index = (slots.cumsum(dim=-1) - 1).clamp(min=0)
            virtual = self.prompt.embedding.weight[index].to(embeddings.dtype)  # (B, T, d_model)
            return torch.where(slots[..., None], virtual, embeddings)

        self.add_hook(model.embed.hook_in, keep_ids)
        self.add_hook(model.hook_dict["hook_embed"], insert)

    def unhook(self, model: nn.Module) -> None:
        self._input_ids = None


# ---- a constant per-layer bias on each head's output ----


@dataclass(frozen=True)
class ZBiasConfig:
    start_layer: int = 2  # first adapted layer, as the aligner's default

    def __post_init__(self) -> None:
        if self.start_layer < 0:
            raise ValueError(f"ZBiasConfig.start_layer must be >= 0, got {self.start_layer}")


@saved_kind
class ZBias(Adapter):
    """A learned constant b[l, h] (d_head numbers) added to head h's output `attn.hook_z` at every position of
    every adapted layer l: the form a one-token aligner takes, without the sharing of one token across layers
    and without the gates. Zero-initialised."""

    kind = "z-bias"
    family = "zbias"
    config_type = ZBiasConfig

    def __init__(self, config: ZBiasConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        shapes = self.tensor_shapes(config, shape)["bias"]
        # A file without d_head gives its width (`empty`); d_model / H is the width of most models, not all.
        self.bias = nn.Parameter(torch.zeros(*shapes[:2], shapes[2] or shape.d_model // shape.n_heads))
        self._off: frozenset[int] = frozenset()  # the adapted layers (0: the first) switched off (`switched_off`)

    @classmethod
    def tensor_shapes(cls, config: ZBiasConfig, shape: ModelShape) -> TensorShapes:
        n_active = shape.n_layers - config.start_layer
        if n_active < 1:
            raise ValueError(f"ZBiasConfig.start_layer={config.start_layer} leaves no layer of {shape.n_layers} to adapt")
        return {"bias": (n_active, shape.n_heads, shape.d_head)}

    @classmethod
    def empty(cls, config: ZBiasConfig, shape: ModelShape, base_model: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ZBias":
        return cls(config, replace(shape, d_head=shapes["bias"][-1]), base_model)

    def hook_into(self, model: nn.Module) -> None:
        if self.bias.shape[-1] != model.cfg.d_head:
            raise ValueError(f"z-bias of {self.bias.shape[-1]} numbers per head, model has d_head {model.cfg.d_head}")
        for i, layer in enumerate(self.switchable_layers):
            self.add_hook(model.blocks[layer].attn.hook_z, lambda z, hook, i=i: z if i in self._off else z + self.bias[i].to(z.dtype))

    @property
    def switchable_layers(self) -> list[int]:
        return list(range(self.config.start_layer, self.shape.n_layers))

    @contextlib.contextmanager
    def switched_off(self, layers: Collection[int]) -> Iterator[None]:
        """Its bias at `layers` is not added."""
        self._off = frozenset(self.switchable_layers.index(layer) for layer in layers)
        try:
            yield
        finally:
            self._off = frozenset()


def one_token_aligner_as_bias(aligner: Aligner, model: nn.Module) -> ZBias:
    """The `ZBias` that computes what a one-token aligner computes: b[l, h] = g[l, h] * (P W_V^l + b_V^l)[h]."""
    if aligner.config.n_tokens != 1:
        raise ValueError(f"only a one-token aligner is a constant bias; this one has N={aligner.config.n_tokens}")
    bias = ZBias(ZBiasConfig(aligner.config.start_layer), shape_of(model), aligner.base_model)
    with torch.no_grad():
        for i, layer in enumerate(aligner.layer_indices):
            v_proj = projection(model.blocks[layer].attn.v)  # the weight the aligner itself reads
            bias.bias[i] = aligner.one_token_contribution(i, v_proj, bias.bias.shape[-1])
    return bias


# ---- a steering vector ----


@dataclass(frozen=True)
class SteeringConfig:
    layer: int = 0  # the layer whose residual input (blocks.{layer}.hook_resid_pre) is steered
    multiplier: float = 1.0  # times the vector

    def __post_init__(self) -> None:
        if self.layer < 0 or not math.isfinite(self.multiplier):
            raise ValueError(f"SteeringConfig needs layer >= 0 and a finite multiplier, got {self.layer}, {self.multiplier}")


@saved_kind
class SteeringVector(Adapter):
    """multiplier * vector added to `blocks.{layer}.hook_resid_pre` at every position (contrastive activation
    addition: `aligner.baselines.fit_steering`). The vector is a buffer, not a parameter: nothing is trained."""

    kind = "steering"
    config_type = SteeringConfig

    def __init__(self, config: SteeringConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        self.register_buffer("vector", torch.zeros(shape.d_model))

    @classmethod
    def tensor_shapes(cls, config: SteeringConfig, shape: ModelShape) -> TensorShapes:
        if config.layer >= shape.n_layers:
            raise ValueError(f"SteeringConfig.layer={config.layer} is not a layer of a {shape.n_layers}-layer model")
        return {"vector": (shape.d_model,)}

    def hook_into(self, model: nn.Module) -> None:
        def steer(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return resid + self.config.multiplier * self.vector.to(resid.dtype)

        self.add_hook(model.hook_dict[f"blocks.{self.config.layer}.hook_resid_pre"], steer)
