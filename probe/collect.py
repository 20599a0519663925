"""Activations of a model over a `ProbeDataset`, with and without each aligner, kept on disk and memory-mapped.

Read a batch at a time, by hooks at the named hook points (`pooling`) that reduce each activation to one vector
per prompt (the `positions` pooling) as it is made, so that no layer's activations outlive their hook, and write
the rows into `.npy` files opened as memory maps. The forward computes no logits but the last position's, where
the model reads `logits_to_keep`: nothing kept reads them. On several processes (`accelerate launch`) the
prompts are shared among them and each writes its rows into the same files. What is kept, per condition (base,
each aligner):

    hook_resid_post.npy    (n, n_layers, d_model)   one array per hook named in `hooks`
    aligner_pattern.npy    (n, n_active, H, N)      attention of the query onto the N prefix slots
    aligner_norm.npy       (n, n_active, H)         |g A V_p|: the size of the gated contribution, per head
    aligner_share.npy      (n, n_active, H)         |g A V_p| / |z_context|: that size next to the head's own output

(The prefix has a softmax of its own, so its attention sums to 1 over the N slots whatever the input; the
question of how much a head listens to the prefix is answered by the share, not by attention mass.)

Each condition is one cache entry, keyed by the model's weights fingerprint, the aligner's tensors, the
dataset's prompts and answers, the positions, the hooks, and the source of the code the forward runs through
(`CODE`: a changed aligner layer or prompt format makes new entries rather than reading old ones).
`aligner.loading.cached_directory` builds it in a staging directory under a file lock, records each file's size
and hash, and rebuilds an entry that is damaged or was made from something else rather than returning wrong data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

import aligner.chat
import aligner.layer
import aligner.model
from aligner import Aligner, model_fingerprint
from aligner.chat import example_ids, prompt_ids
from aligner.distributed import launched_accelerator
from aligner.files import atomic_write_json, read_json, source_digest
from aligner.loading import cache_dir, cached_directory
from aligner.model import AlignerHooks
from aligner.objective import reads_logits_to_keep
from probe.dataset import ProbeDataset
from probe.progress import steps

CACHE_FORMAT = "aligner-workbench/probe-activations/1"
CODE = (aligner.layer, aligner.model, aligner.chat, sys.modules[__name__])  # what the kept activations depend on
META_FILE = "meta.json"
# How a prompt's activations become one vector: the last prompt token (where the first answer token is
# predicted), the mean over the prompt's tokens, or the mean over the (first) gold answer's tokens read after it.
POSITIONS = ("last_prompt", "prompt_mean", "answer_mean")
DEFAULT_HOOKS = ("hook_resid_post",)
ALIGNER_ARRAYS = ("aligner_pattern", "aligner_norm", "aligner_share")
EPS = 1e-8


@dataclass(frozen=True)
class Activations:
    """What `collect` returns: per condition ("base", run names), arrays of one row per prompt (memory maps)."""

    dataset: ProbeDataset
    positions: str
    hooks: tuple[str, ...]
    arrays: dict[str, dict[str, np.ndarray]]  # condition -> array name -> array
    aligners: dict[str, Aligner | None]  # condition -> its aligner (None: the base model)
    paths: dict[str, Path]  # condition -> its cache entry

    @property
    def conditions(self) -> list[str]:
        return list(self.arrays)

    def resid(self, condition: str, hook: str = DEFAULT_HOOKS[0]) -> np.ndarray:
        """(n, n_layers, d_model): `blocks.{l}.{hook}` for every layer."""
        return self.arrays[condition][hook]


def aligner_key(aligner: Aligner) -> str:
    """A digest of what an aligner does: its config and the bytes of its tokens and gates."""
    digest = hashlib.sha256(json.dumps([aligner.config.to_dict(), aligner.shape.to_dict()]).encode())
    for tensor in (aligner.tokens, aligner.gates):
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def condition_name(item: None | str | Path | Aligner) -> str:
    """"base" for None, the directory name of a run, "aligner-<digest>" for an Aligner object."""
    if item is None:
        return "base"
    if isinstance(item, Aligner):
        return f"aligner-{aligner_key(item)[:8]}"
    return Path(item).name


def collect(
    model: nn.Module,
    dataset: ProbeDataset,
    aligners: Sequence[None | str | Path | Aligner] = (None,),
    hooks: Sequence[str] = DEFAULT_HOOKS,
    positions: str = "last_prompt",
    batch_size: int = 32,  # prompts per forward: on a small model the work per operator, not the arithmetic, sets the pace
    cache: str | Path | None = None,
) -> Activations:
    """Activations of `model` (a TransformerBridge) on `dataset`, once per entry of `aligners` (None: the base
    model; a run directory; an Aligner), at `positions` (see POSITIONS), for each of `hooks` (`blocks.{l}.{hook}`
    at every layer, a hook point shaped (batch, position, d_model)), plus the aligner's own hook points. Entries are
    kept under `cache` (default: `aligner.loading.cache_dir()/probe`); a second call with the same inputs reads them
    back.

    Under `accelerate launch`, every process calls this with the same arguments, each with its model on its own
    device: the prompts are shared among the processes, each writes its rows into the one entry (the cache must
    be a directory all of them see), and every process returns the whole of it."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if isinstance(getattr(model, "aligner", None), AlignerHooks):
        raise ValueError("the model has an aligner attached; detach it: collect attaches each aligner itself")
    root = Path(cache) if cache is not None else cache_dir() / "probe"
    accelerator = launched_accelerator()
    fingerprint, code = model_fingerprint(model), source_digest(*CODE)
    arrays, loaded, paths = {}, {}, {}
    for item in aligners:
        name = condition_name(item)
        if name in arrays:
            raise ValueError(f"two conditions named {name!r}: give the runs distinct directory names")
        al = Aligner.load(item) if isinstance(item, (str, Path)) else item
        source = {
            "format": CACHE_FORMAT,
            "model": fingerprint,
            "aligner": None if al is None else aligner_key(al),
            "dataset": dataset.key(),
            "positions": positions,
            "hooks": list(hooks),
            "code": code,
        }
        entry = root / hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:24]
        shapes = _array_shapes(model, len(dataset), al, tuple(hooks))

        def fill(staging: Path, rows: range, al: Aligner | None = al, name: str = name) -> None:
            _write_activations(staging, model, dataset, al, name, tuple(hooks), positions, batch_size, rows)

        def finish(staging: Path, al: Aligner | None = al, arrays: list[str] = list(shapes)) -> None:
            _write_meta(staging, dataset, al, positions, arrays)

        _build_entry(accelerator, entry, source, len(dataset), partial(_create_arrays, shapes=shapes), fill, finish)
        meta = read_json(entry / META_FILE)
        arrays[name] = {array: np.load(entry / f"{array}.npy", mmap_mode="r") for array in meta["arrays"]}
        loaded[name], paths[name] = al, entry
    return Activations(dataset, positions, tuple(hooks), arrays, loaded, paths)


def _token_rows(model: nn.Module, dataset: ProbeDataset, positions: str) -> list[tuple[list[int], int, int]]:
    """(token ids, first, end) per prompt: the ids the model reads and the span [first, end) that is pooled."""
    rows = []
    for i, prompt in enumerate(dataset.prompts):
        if positions == "answer_mean":
            ids, n_prompt = example_ids(model.tokenizer, prompt, dataset.answers[i][0], system=dataset.system)
            rows.append((ids, n_prompt, len(ids) - 1))  # the answer's tokens, its end-of-turn token left out
        else:
            ids = prompt_ids(model.tokenizer, prompt, system=dataset.system)
            rows.append((ids, len(ids) - 1 if positions == "last_prompt" else 0, len(ids)))
    return rows


def _build_entry(
    accelerator: Accelerator,
    entry: Path,
    source: dict[str, Any],
    n: int,
    create: Callable[[Path], None],
    fill: Callable[[Path, range], None],
    finish: Callable[[Path], None],
) -> None:
    """Make the cache entry `entry` unless an intact one made from `source` is there (`cached_directory`), its n
    rows shared among the processes: the main process makes the staging directory and the empty arrays under the
    cache's lock (`create`), every process writes its share of the rows into them (`fill`), the main process
    writes the rest (`finish`) and publishes the entry, and no process goes on before it is published. On one
    process, that process does it all."""
    staging: list[str | None] = [None]  # where the rows go, sent from the main process to the others
    with accelerator.split_between_processes(list(range(n))) as share:
        mine = range(share[0], share[-1] + 1) if share else range(0)  # consecutive rows
        if accelerator.is_main_process:

            def build(directory: Path) -> None:
                create(directory)
                staging[0] = str(directory)
                broadcast_object_list(staging)
                fill(directory, mine)
                accelerator.wait_for_everyone()  # every share is written
                finish(directory)

            cached_directory(entry, build, source)
            if staging[0] is None:  # the entry was there already: the others have nothing to write
                broadcast_object_list(staging)
        else:
            broadcast_object_list(staging)
            if staging[0] is not None:
                fill(Path(staging[0]), mine)
                accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()  # the entry is published before any process reads it


def _array_shapes(model: nn.Module, n: int, al: Aligner | None, hooks: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The arrays of one condition over n prompts, and their shapes (see the top of this file)."""
    shapes = {hook: (n, model.cfg.n_layers, model.cfg.d_model) for hook in hooks}
    if al is not None:
        n_active, heads = len(al.layer_indices), al.shape.n_heads
        shapes |= {
            "aligner_pattern": (n, n_active, heads, al.config.n_tokens),
            "aligner_norm": (n, n_active, heads),
            "aligner_share": (n, n_active, heads),
        }
    return shapes


def _create_arrays(target: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Empty float32 `.npy` files of these shapes in `target`, for the processes to fill."""
    for array, shape in shapes.items():
        np.lib.format.open_memmap(target / f"{array}.npy", "w+", np.float32, shape).flush()


@contextlib.contextmanager
def pooling(
    model: nn.Module, hooks: Sequence[str], aligner_layers: Sequence[int] = ()
) -> Iterator[Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]:
    """Within it, `pool(ids, weights)` runs `model` on ids (B, T) and returns the arrays of the top of this file
    for that batch, each activation pooled over the positions by weights (B, T) as its hook point makes it:
    `blocks.{l}.{hook}` for every layer and each of `hooks` (B, n_layers, d_model), and for the adapted layers
    `aligner_layers` the aligner's pattern (B, n_active, H, N), norm and share (B, n_active, H). The hooks are added
    once, for every batch; an aligner, if any, is attached before."""
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    state: dict[str, Any] = {}  # the batch's weights, the gated contribution of the layer running, the arrays made
    # On a small model the host's time per operator sets the pace of a forward, so each hook runs few operators: the
    # weights are shaped once per batch (and moved once to each device a layer runs on), and one product pools.

    def weights_on(device: torch.device) -> torch.Tensor:  # (B, 1, T): the batch's weights, on `device`
        weights = state["weights"]
        if device not in weights:
            weights[device] = next(iter(weights.values())).to(device)
        return weights[device]

    def pooled(activation: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, D): weighted over T, in float32
        activation = activation if activation.dtype == torch.float32 else activation.float()
        return torch.bmm(weights_on(activation.device), activation).squeeze(1)

    def keep(array: str, index: int, activation: torch.Tensor, hook: Any) -> None:
        if activation.dim() != 3 or activation.shape[-1] != d_model:
            raise ValueError(
                f"hooks: blocks.{index}.{array} gives activations shaped {tuple(activation.shape)}; collect keeps hook points "
                f"shaped (batch, position, d_model = {d_model}), such as hook_resid_post, hook_attn_out, hook_mlp_out"
            )
        state[array][index] = pooled(activation)

    def keep_pattern(index: int, pattern: torch.Tensor, hook: Any) -> None:  # (B, H, T, N) -> (B, H, N)
        state["aligner_pattern"][index] = (pattern.float() * weights_on(pattern.device).unsqueeze(-1)).sum(2)

    def keep_gated(gated: torch.Tensor, hook: Any) -> None:  # (B, T, H, d_head): the aligner's, added to attn.hook_z
        state["gated"] = gated

    def keep_shares(index: int, z: torch.Tensor, hook: Any) -> None:
        # attn.hook_z, read after the aligner's own hook there has added the gated contribution to it
        gated = state.pop("gated").float()
        norm = gated.norm(dim=-1)  # (B, T, H)
        context = (z.float() - gated).norm(dim=-1)  # the head's output without the prefix
        state["aligner_norm"][index] = pooled(norm)
        state["aligner_share"][index] = pooled(norm / (context + EPS))

    fwd_hooks = [(f"blocks.{layer}.{hook}", partial(keep, hook, layer)) for hook in hooks for layer in range(n_layers)]
    for i, layer in enumerate(aligner_layers):
        fwd_hooks += [
            (f"blocks.{layer}.aligner.hook_pattern", partial(keep_pattern, i)),
            (f"blocks.{layer}.aligner.hook_z", keep_gated),
            (f"blocks.{layer}.attn.hook_z", partial(keep_shares, i)),
        ]
    sizes = {hook: n_layers for hook in hooks}
    if aligner_layers:
        sizes |= dict.fromkeys(ALIGNER_ARRAYS, len(aligner_layers))
    keep_logits = {"logits_to_keep": 1} if reads_logits_to_keep(model) else {}

    def pool(ids: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        state.clear()
        state["weights"] = {weights.device: weights.unsqueeze(1)}
        state.update({array: [None] * size for array, size in sizes.items()})
        with torch.no_grad():
            model(ids, **keep_logits)
        device = weights.device  # rows that a layer on another device left there are moved
        moved = {array: [x if x.device == device else x.to(device) for x in state[array]] for array in sizes}
        return {array: torch.stack(rows, dim=1) for array, rows in moved.items()}

    with model.hooks(fwd_hooks=fwd_hooks):
        yield pool


def _write_activations(
    target: Path,
    model: nn.Module,
    dataset: ProbeDataset,
    al: Aligner | None,
    name: str,
    hooks: tuple[str, ...],
    positions: str,
    batch_size: int,
    rows: range,
) -> None:
    """Run the model over the prompts `rows` of `dataset` in batches and write their pooled activations into the
    arrays in `target`."""
    out = {
        array: np.load(target / f"{array}.npy", mmap_mode="r+")
        for array in _array_shapes(model, len(dataset), al, hooks)
    }
    token_rows = _token_rows(model, dataset, positions)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        if al is not None:
            stack.enter_context(al.attached(model))
        pool = stack.enter_context(pooling(model, hooks, al.layer_indices if al is not None else ()))
        for start in steps(range(rows.start, rows.stop, batch_size), f"collect {name}", unit="batch"):
            batch = token_rows[start : min(start + batch_size, rows.stop)]
            length = max(len(ids) for ids, _, _ in batch)
            # Right padding: causal attention never looks ahead, so the pooled positions never see the padding.
            ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _, _ in batch], device=device)
            weights = torch.zeros(len(batch), length, device=device)  # (B, T): the pooling of each row
            for b, (_, first, end) in enumerate(batch):
                weights[b, first:end] = 1.0 / (end - first)
            for array, values in pool(ids, weights).items():
                out[array][start : start + len(batch)] = values.cpu().numpy()
    for array in out.values():
        array.flush()


def _write_meta(target: Path, dataset: ProbeDataset, al: Aligner | None, positions: str, arrays: list[str]) -> None:
    atomic_write_json(
        target / META_FILE,
        {
            "format": CACHE_FORMAT,
            "dataset": dataset.name,
            "n_prompts": len(dataset),
            "positions": positions,
            "aligner_layers": list(al.layer_indices) if al is not None else [],
            "arrays": sorted(arrays),
        },
    )
