"""Every contact with TransformerLens's and torch's internals, in one place.

The adapters change a `TransformerBridge` through its public hook points where they can. Some things have no
public call: adding hook points to a bridge after it is built (its name registry), telling whether a hook point
has anything hooked (torch's hook dictionaries), removing a permanent hook, reaching or swapping the
transformers module that a bridge component wraps (`swap_projection`), and putting the transformers model's own modules back in place
of the bridge's components for a while (`plain_model`). They live here, so that a change in either library is
mended in one file.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import nn
from transformer_lens.hook_points import HookPoint, LensHandle
from transformers import PreTrainedModel

Handle = tuple[HookPoint, LensHandle]


def hooked(hook_point: HookPoint) -> bool:
    """Whether anything is hooked at `hook_point`: a forward or backward hook, added by TransformerLens
    (`add_hook`, `run_with_cache`, `hooks()`) or by torch on it (`register_forward_hook`, ...). torch's global
    module hooks, which watch every module, do not count."""
    return bool(
        hook_point._forward_hooks
        or hook_point._forward_pre_hooks
        or hook_point._backward_hooks
        or hook_point._backward_pre_hooks
    )


def add_permanent_hook(hook_point: HookPoint, fn: Callable[..., Any], prepend: bool = False) -> Handle:
    """Add `fn` at `hook_point` so that a user's `reset_hooks()` leaves it in place; `remove_hook` takes it away."""
    return hook_point, hook_point.add_hook(fn, is_permanent=True, prepend=prepend)


def remove_hook(handle: Handle) -> None:
    """Remove a hook that `add_permanent_hook` added (TransformerLens keeps no public call for one permanent hook)."""
    hook_point, lens_handle = handle
    lens_handle.hook.remove()
    if lens_handle in hook_point.fwd_hooks:
        hook_point.fwd_hooks.remove(lens_handle)


def register_hook_point(model: nn.Module, name: str, hook_point: HookPoint) -> None:
    """Make `hook_point` one of `model`'s under `name`: the bridge fills its name registry when it is built, and
    `run_with_cache`, `hooks()` and `hook_dict` find hook points there."""
    hook_point.name = name
    model._hook_registry[name] = hook_point


def unregister_hook_point(model: nn.Module, name: str) -> None:
    model._hook_registry.pop(name, None)


def set_submodule(parent: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put `module` under `parent.name` (None: take it away, if there), so that its parameters and hook points
    follow the parent's `.to()`, `named_modules()` and state dict while there."""
    if module is not None:
        parent.add_module(name, module)
    elif name in parent._modules:
        del parent._modules[name]


def wrapped(component: nn.Module) -> nn.Module:
    """The transformers module a bridge component wraps (`attn.k` -> its nn.Linear); the module itself where it
    wraps none."""
    return getattr(component, "original_component", component)


def swap_projection(holder: nn.Module, name: str, module: nn.Module) -> None:
    """Make projection `name` of `holder` compute with `module` (peft's LoRA layer around the base projection, and
    back): the bridge component there wraps it instead, or, on a transformers module, the attribute is it."""
    child = getattr(holder, name)
    if wrapped(child) is not child:
        child.set_original_component(module)
    else:
        setattr(holder, name, module)


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The transformers model under a bridge, or the model itself where it is a transformers model; None for a
    module that is neither."""
    if isinstance(model, PreTrainedModel):
        return model
    return getattr(model, "original_model", None)


def is_bridge(model: nn.Module) -> bool:
    """Whether `model` is a TransformerBridge (it wraps a transformers model), not a transformers model itself."""
    return not isinstance(model, PreTrainedModel) and transformers_model(model) is not None


def any_hooked(model: nn.Module) -> bool:
    """Whether anything is hooked at any of bridge `model`'s hook points (a user's hooks, or an adapter attached
    through them): a run of the plain model would leave them out."""
    return any(hooked(hook_point) for hook_point in model.hook_dict.values())


@contextlib.contextmanager
def plain_model(model: nn.Module) -> Iterator[nn.Module]:
    """The transformers model under bridge `model`, its own modules back where the bridge put its components
    (each component wraps the very module it replaced, so the weights are the same tensors); on exit the
    components go back. Inside, the model runs as transformers wrote it, at its speed, and no bridge hook fires:
    calling the bridge then runs this plain model. A transformers model is yielded as it is."""
    if not is_bridge(model):
        yield model
        return
    hf = transformers_model(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child's name, the bridge component there)

    def unwrap(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            original = getattr(child, "original_component", None)
            if original is not None and original is not child:
                swapped.append((module, name, child))
                module._modules[name] = original
                child = original
            unwrap(child)

    try:
        unwrap(hf)
        yield hf
    finally:
        for parent, name, component in reversed(swapped):
            parent._modules[name] = component


def submodule(component: nn.Module, name: str) -> nn.Module | None:
    """The bridge component's declared child `name` (e.g. an attention's `k_norm`) where it has one, without
    nn.Module's attribute lookup falling through to the wrapped module."""
    return component._modules.get(name)
