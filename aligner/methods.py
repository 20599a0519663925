"""What the suite compares: every way of changing a frozen base model that one trainer can train.

A `Method` has parameters (only the trainable ones), a count of them, an `attached(model)` context in which the
bridge computes with it, and files (safetensors + JSON) in a run directory. `Aligner` (model.py) is one as it
stands, with `shared=False` being LLaMA-Adapter; the others are here:

    LoRA          peft's LoRA layer on chosen projections (q and v, as in the LoRA and Aligner papers),
                  swapped into the bridge's linear components while attached and out again after
    PromptTuning  peft's prompt embedding: N virtual tokens in front of the user's turn
    ZBias         a learned constant added to each head's output (attn.hook_z) of each adapted layer

N = 1 makes the aligner's prefix softmax a single slot (always 1), so a one-token aligner adds the constant
g[l, h] * (W_V^l P + b_V^l) to every position of head h of layer l: a `ZBias` whose per-layer vectors are tied
through the one token P. `one_token_aligner_as_bias` writes that out (tests check the logits agree).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformer_lens.hook_points import HookPoint, LensHandle
from transformers import PreTrainedTokenizerBase

from aligner.chat import prompt_ids
from aligner.config import ModelShape
from aligner.files import atomic_write_bytes, atomic_write_json, provenance, read_json
from aligner.model import CONFIG_FILE as ALIGNER_CONFIG_FILE
from aligner.model import Aligner, projection, shape_of

FORMAT = "aligner-workbench/method/1"
TENSORS_FILE = "method.safetensors"
CONFIG_FILE = "method.json"


@runtime_checkable
class Method(Protocol):
    """A trainable change to a frozen bridge: what `train_sft` trains and the suite compares."""

    provenance: dict[str, Any]

    def parameters(self) -> Iterator[nn.Parameter]: ...  # the trainable parameters, and only those

    def num_parameters(self) -> int: ...

    def attached(self, model: nn.Module) -> contextlib.AbstractContextManager: ...

    def save(self, path: str | Path) -> Path: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...  # its tensors by name, as its files and checkpoints hold them

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None: ...  # in place, checked


class HookedMethod(nn.Module):
    """The parts every method of this file shares: a config dataclass, the base model's shape and name, hooks on
    the bridge that `detach` removes, and files."""

    kind: ClassVar[str]  # the name in method.json
    config_type: ClassVar[type]

    def __init__(self, config: Any, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.shape = shape
        self.base_model = dict(base_model or {"name": None, "fingerprint": None})
        self.provenance: dict[str, Any] = {}
        self._model: nn.Module | None = None
        self._handles: list[tuple[HookPoint, LensHandle]] = []

    @classmethod
    def for_model(cls, model: nn.Module, config: Any) -> "HookedMethod":
        """A fresh method shaped for `model` (a TransformerBridge); its random initialisation reads torch's RNG."""
        from aligner.loading import model_fingerprint

        method = cls(config, shape_of(model), {"name": model.cfg.model_name, "fingerprint": model_fingerprint(model)})
        method.initialise(model)
        return method.to(next(model.parameters()).device)

    def initialise(self, model: nn.Module) -> None:
        """Set the initial values that depend on the base model; the default has none."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def format_prompt(self, prompt: str) -> str:
        """The user's turn as this method needs it; only prompt tuning changes it."""
        return prompt

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["HookedMethod"]:
        if self._model is not None:
            raise RuntimeError(f"this {self.kind} is already attached to a model")
        if shape_of(model) != self.shape:
            raise ValueError(f"{self.kind} made for {self.shape}, model has {shape_of(model)}")
        object.__setattr__(self, "_model", model)  # outside nn.Module's registry: the model is not a submodule
        try:
            self.attach(model)
            yield self
        finally:
            self.detach(model)
            for hook_point, handle in self._handles:
                handle.hook.remove()
                if handle in hook_point.fwd_hooks:
                    hook_point.fwd_hooks.remove(handle)
            self._handles = []
            object.__setattr__(self, "_model", None)

    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        """Undo what `attach` did besides adding hooks (those are removed for every method)."""

    def add_hook(self, hook_point: HookPoint, fn: Any) -> None:
        # Permanent, as the aligner's: a user's reset_hooks() leaves the method in place.
        self._handles.append((hook_point, hook_point.add_hook(fn, is_permanent=True)))

    # ---- files ----

    def save(self, path: str | Path) -> Path:
        """Write `method.safetensors` (the state dict) and `method.json` (kind, config, shape, base model, provenance)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.provenance = {**provenance(), **self.provenance}
        atomic_write_bytes(path / TENSORS_FILE, save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}))
        atomic_write_json(
            path / CONFIG_FILE,
            {
                "format": FORMAT,
                "kind": self.kind,
                "config": asdict(self.config),
                "shape": self.shape.to_dict(),
                "base_model": self.base_model,
                "num_parameters": self.num_parameters(),
                "provenance": self.provenance,
            },
        )
        return path

    @classmethod
    def from_files(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> "HookedMethod":
        shape = ModelShape.from_dict(meta["shape"], source)
        method = cls.to_load(cls.config_type(**meta["config"]), shape, meta["base_model"], tensors)
        method.provenance = meta["provenance"]
        method.load_tensors(tensors, source)
        return method

    @classmethod
    def to_load(
        cls, config: Any, shape: ModelShape, base_model: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "HookedMethod":
        """The method that a file's `tensors` are loaded into; a size the model shape does not hold comes from them."""
        return cls(config, shape, base_model)

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy the tensors of its state dict in, in place (an optimizer over them stays valid), once their names,
        shapes and finite values are checked; the error names `source`."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            raise ValueError(f"{source}: tensors {found}, expected {expected} for {self.config}")
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{source}: tensor {name!r} has NaN or inf values, expected all finite")
        self.load_state_dict(tensors)


# ---- LoRA (through peft) ----


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of each update
    alpha: float = 8.0  # the update is scaled by alpha / r (peft's lora_alpha); alpha = r: scale 1
    targets: tuple[str, ...] = ("q", "v")  # attention projections adapted in every layer (bridge names q, k, v, o)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a list when read back from JSON


class LoRA(HookedMethod):
    """Low-rank updates W + (alpha / r) B A of chosen attention projections (Hu et al. 2021), each computed by
    peft's `lora.Linear`. The A and B matrices are this module's; while attached, each target's
    `LinearBridge` wraps a peft layer around the base projection, holding these A and B, and afterwards the base
    projection alone again, so the same frozen model serves every method. Initialised as peft does: A
    Kaiming-uniform, B zero (an untrained LoRA changes nothing)."""

    kind = "lora"
    config_type = LoRAConfig

    def __init__(self, config: LoRAConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._wrapped: list[tuple[nn.Module, nn.Module]] = []  # (linear bridge, its base projection)

    def initialise(self, model: nn.Module) -> None:
        for key, bridge in self._targets(model):
            base = bridge.original_component
            self.lora_A[key] = nn.Linear(base.in_features, self.config.r, bias=False)  # Kaiming-uniform, as peft
            self.lora_B[key] = nn.Linear(self.config.r, base.out_features, bias=False)
            nn.init.zeros_(self.lora_B[key].weight)

    def _targets(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for layer in range(self.shape.n_layers):
            for target in self.config.targets:
                yield f"{layer}_{target}", getattr(model.blocks[layer].attn, target)

    def attach(self, model: nn.Module) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, target_modules=list(self.config.targets))
        for key, bridge in self._targets(model):
            base = bridge.original_component
            with torch.random.fork_rng(devices=[]):  # peft initialises A and B, which are replaced at once
                wrapper = PeftLoraLinear(base, "default", config=peft_config, r=self.config.r, lora_alpha=self.config.alpha)
            wrapper.lora_A["default"] = self.lora_A[key]
            wrapper.lora_B["default"] = self.lora_B[key]
            bridge.set_original_component(wrapper)
            self._wrapped.append((bridge, base))

    def detach(self, model: nn.Module) -> None:
        for bridge, base in self._wrapped:
            bridge.set_original_component(base)
        self._wrapped = []

    @classmethod
    def to_load(
        cls, config: LoRAConfig, shape: ModelShape, base_model: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "LoRA":
        # The matrices' sizes come from the tensors: the model shape does not hold the key/value width.
        shell = cls(config, shape, base_model)
        for name, tensor in tensors.items():
            matrices, key, _ = name.split(".")
            out_features, in_features = tensor.shape
            getattr(shell, matrices)[key] = nn.Linear(in_features, out_features, bias=False)
        return shell


# ---- prompt tuning (through peft) ----


@dataclass(frozen=True)
class PromptTuningConfig:
    n_tokens: int = 10  # virtual tokens
    # The special token that marks each virtual token's slot in a prompt; None: the model's own (`placeholder_for`),
    # chosen by `PromptTuning.for_model` and saved with the method.
    placeholder: str | None = None


# The placeholder of every prompt-tuning file written before it was chosen per tokenizer (SmolLM2's unknown token).
FORMER_PLACEHOLDER = "<|endoftext|>"


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
    for candidate in dict.fromkeys([tokenizer.unk_token, FORMER_PLACEHOLDER, *specials]):
        if candidate is not None and placeholder_problem(tokenizer, candidate) is None:
            return candidate
    raise ValueError(
        f"{type(tokenizer).__name__} ({tokenizer.name_or_path}) has no special token free to mark prompt tuning's "
        "slots: each one pads, begins or ends a sequence, is written by the chat template, or is not one token. "
        "Name one in PromptTuningConfig(placeholder=...)"
    )


class PromptTuning(HookedMethod):
    """N learned input embeddings (Lester et al. 2021), held in peft's `PromptEmbedding` and initialised from the
    embeddings of random vocabulary tokens (peft's SAMPLE_VOCAB). peft prepends them to the whole input; here they
    sit at the start of the user's turn: `format_prompt` puts N placeholder tokens there (a special token of the
    model's that nothing else puts in a prompt: `placeholder_for`), and a hook on `hook_embed` puts the learned
    embeddings in their place. Positions, padding and the KV cache are then the bridge's own, so generation needs
    nothing else."""

    kind = "prompt-tuning"
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
        self.prompt = self._peft_embedding(model.embed.original_component, init="SAMPLE_VOCAB")

    @classmethod
    def from_files(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> "PromptTuning":
        config = {"placeholder": FORMER_PLACEHOLDER, **meta["config"]}  # a file from before the field
        return super().from_files({**meta, "config": config}, tensors, source)

    def format_prompt(self, prompt: str) -> str:
        if self.config.placeholder is None:
            raise ValueError(
                "this prompt tuning has no placeholder yet: make it with PromptTuning.for_model(model, config), "
                "which chooses the model's, or name one in PromptTuningConfig(placeholder=...)"
            )
        return self.config.placeholder * self.config.n_tokens + prompt

    def attach(self, model: nn.Module) -> None:
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
                        "`aligner.methods.prompts_for` (train_sft, train_dpo and suite.answer do)"
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

    def detach(self, model: nn.Module) -> None:
        self._input_ids = None


# ---- a constant per-layer bias on each head's output ----


@dataclass(frozen=True)
class ZBiasConfig:
    start_layer: int = 2  # first adapted layer, as the aligner's default


class ZBias(HookedMethod):
    """A learned constant b[l, h] (d_head numbers) added to head h's output `attn.hook_z` at every position of
    every adapted layer l: the form a one-token aligner takes, without the sharing of one token across layers
    and without the gates. Zero-initialised."""

    kind = "z-bias"
    config_type = ZBiasConfig

    def __init__(
        self, config: ZBiasConfig, shape: ModelShape, base_model: dict[str, Any] | None = None, d_head: int | None = None
    ) -> None:
        """`d_head`: the width of each head's output, the model's `cfg.d_head`; None: d_model / H, which the model
        shape implies on most models but not all (Gemma 3 270M: 256, against 640 / 4). `for_model` and the files
        set the model's own."""
        super().__init__(config, shape, base_model)
        n_active = shape.n_layers - config.start_layer
        self.bias = nn.Parameter(torch.zeros(n_active, shape.n_heads, d_head or shape.d_model // shape.n_heads))

    def initialise(self, model: nn.Module) -> None:
        if self.bias.shape[-1] != model.cfg.d_head:
            self.bias = nn.Parameter(self.bias.new_zeros(*self.bias.shape[:-1], model.cfg.d_head))

    @classmethod
    def to_load(
        cls, config: ZBiasConfig, shape: ModelShape, base_model: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "ZBias":
        # d_head comes from the tensor, as LoRA's widths do; a tensor of another rank fails load_tensors' check.
        bias = tensors.get("bias")
        return cls(config, shape, base_model, bias.shape[-1] if bias is not None and bias.dim() == 3 else None)

    def attach(self, model: nn.Module) -> None:
        if self.bias.shape[-1] != model.cfg.d_head:
            raise ValueError(f"z-bias of {self.bias.shape[-1]} numbers per head, model has d_head {model.cfg.d_head}")
        for i, layer in enumerate(range(self.config.start_layer, self.shape.n_layers)):
            self.add_hook(model.blocks[layer].attn.hook_z, lambda z, hook, i=i: z + self.bias[i].to(z.dtype))


def one_token_aligner_as_bias(aligner: Aligner, model: nn.Module) -> ZBias:
    """The `ZBias` that computes what a one-token aligner computes: b[l, h] = g[l, h] * (P W_V^l + b_V^l)[h]."""
    if aligner.config.n_tokens != 1:
        raise ValueError(f"only a one-token aligner is a constant bias; this one has N={aligner.config.n_tokens}")
    bias = ZBias(ZBiasConfig(aligner.config.start_layer), aligner.shape, aligner.base_model, model.cfg.d_head)
    with torch.no_grad():
        for i, layer in enumerate(aligner.layer_indices):
            v_proj = projection(model.blocks[layer].attn.v)  # the weight the aligner itself reads
            bias.bias[i] = aligner.one_token_contribution(i, v_proj, bias.bias.shape[-1])
    return bias


# ---- files ----

METHOD_KINDS = {cls.kind: cls for cls in (LoRA, PromptTuning, ZBias)}


def load_method(path: str | Path, device: str | torch.device = "cpu") -> Method:
    """An aligner (aligner.json) or any method of this file (method.json) from its directory."""
    path = Path(path)
    if (path / ALIGNER_CONFIG_FILE).is_file():
        return Aligner.load(path, device)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a run directory (expected {ALIGNER_CONFIG_FILE} or {CONFIG_FILE} in it)")
    meta = read_json(path / CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in METHOD_KINDS:
        raise ValueError(f"{path / CONFIG_FILE}: not a method file of format {FORMAT!r} with a known kind")
    tensors = load_file(path / TENSORS_FILE)
    return METHOD_KINDS[meta["kind"]].from_files(meta, tensors, str(path / TENSORS_FILE)).to(device)


def heldout_loss(
    model: nn.Module, examples: Sequence[Any], system: str | None = None, batch_size: int = 8, chat_template: bool = True
) -> float:
    """Mean cross-entropy per response token of `examples` (aligner.data.Example) under whatever is attached to
    `model`: the number early stopping and the steering baseline's choices read. `chat_template` as TrainConfig's."""
    from aligner.train import (
        IGNORE_INDEX,
        TrainConfig,
        make_batch,
        pad_token_id,
        response_loss,
        tokenize_examples,
    )

    sequences = tokenize_examples(model.tokenizer, examples, TrainConfig(system=system, chat_template=chat_template))
    pad_id = pad_token_id(model.tokenizer)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            input_ids, labels = make_batch(sequences[start : start + batch_size], pad_id)
            total += response_loss(model, input_ids.to(device), labels.to(device)).item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


def prompts_for(method: Method | None, prompts: Sequence[str]) -> list[str]:
    """The user's turns as `method` reads them (prompt tuning's placeholders in front; others unchanged)."""
    if isinstance(method, HookedMethod):
        return [method.format_prompt(p) for p in prompts]
    return list(prompts)


Prompted = TypeVar("Prompted")  # a dataclass with a `prompt` field: an Example, a Pair


def formatted_for(method: Method | None, records: Sequence[Prompted]) -> list[Prompted]:
    """Each record with its prompt as `method` reads it (`prompts_for`), the rest of it unchanged."""
    prompts = prompts_for(method, [record.prompt for record in records])
    return [replace(record, prompt=prompt) for record, prompt in zip(records, prompts)]
