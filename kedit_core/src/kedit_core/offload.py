"""Where a weight lives in a model dispatched by accelerate (``device_map=...``).

accelerate offloads a module's weights (to CPU memory or to disk) by leaving its parameters on the
``meta`` device and attaching an ``AlignDevicesHook`` (``module._hf_hook``) whose ``weights_map`` holds
the real values; the hook loads them onto its ``execution_device`` before each forward and drops them
after. Reading or writing such a parameter in place reads nothing and writes nothing. This module finds
the slot in the hook's map (:func:`offload_slot`) so that :func:`~kedit_core.architecture.weight_value`
and :func:`~kedit_core.architecture.write_weight` read and write the value the next forward uses.

Writes never touch files: a weight accelerate reads from a safetensors file (disk offload) is
overridden in the loader's in-memory ``state_dict``, and the override is dropped again as soon as it
equals the file's value bit for bit (a revert leaves the loader as it was). Nothing here imports
accelerate: the hooks and maps are recognized by their attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import KeditError


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks attached to ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


@dataclass
class OffloadSlot:
    """An offloaded tensor: ``module.<local>`` (on ``meta``), its value in ``storage[key]``."""

    hook: Any
    owner: nn.Module  # the module the hook is attached to
    module: nn.Module  # the module holding the tensor
    local: str
    storage: Any  # the mapping the value is read from (a dict, or accelerate's OffloadedWeightsLoader)
    key: str

    def tensor(self) -> torch.Tensor:
        """The module's own tensor object (``meta`` outside a forward)."""
        return self.module._parameters.get(self.local, self.module._buffers.get(self.local))

    def read(self) -> torch.Tensor:
        return self.storage[self.key]

    def write(self, value: torch.Tensor) -> None:
        """Store ``value`` (a tensor of its own, not shared with the caller) as the offloaded value."""
        loader_state = getattr(self.storage, "state_dict", None)
        index = getattr(self.storage, "index", None)
        if isinstance(loader_state, dict) and isinstance(index, dict):  # accelerate's OffloadedWeightsLoader
            loader_state.pop(self.key, None)
            if self.key in index and _same_bits(self.storage[self.key], value):
                return  # the file's own value: no override
            loader_state[self.key] = value
        else:
            self.storage[self.key] = value


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(flat[0], flat[1])


def _storage(weights_map: Any, key: str) -> tuple[Any, str] | None:
    """The innermost mapping holding ``key`` of ``weights_map`` (``PrefixedDataset`` unwrapped) and its
    key there, without reading the value (a membership test on a loader would read it from disk)."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        weights_map, key = weights_map.dataset, f"{weights_map.prefix}{key}"
    loader_state, index = getattr(weights_map, "state_dict", None), getattr(weights_map, "index", None)
    if isinstance(loader_state, dict) and isinstance(index, dict):
        return (weights_map, key) if key in loader_state or key in index else None
    return (weights_map, key) if key in weights_map else None


def offload_slot(model: nn.Module, name: str) -> OffloadSlot | None:
    """Where the value of parameter or buffer ``name`` is kept when accelerate offloaded it; None when
    the tensor itself holds the value."""
    path, _, local = name.rpartition(".")
    parts = path.split(".") if path else []
    module = model.get_submodule(path)
    tensor = module._parameters.get(local, module._buffers.get(local))
    if tensor is None:
        return None
    for depth in range(len(parts), -1, -1):
        owner = module if depth == len(parts) else model.get_submodule(".".join(parts[:depth]))
        for hook in _hooks(owner):
            if not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
                continue
            if depth < len(parts) and not getattr(hook, "place_submodules", False):
                continue
            found = _storage(hook.weights_map, ".".join([*parts[depth:], local]))
            if found is not None:
                return OffloadSlot(hook, owner, module, local, *found)
    return None


def held_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor an offload map keeps in memory for ``name`` (CPU offload; weights that were tied
    before accelerate untied their placeholders share its memory), or None: not offloaded, or read
    from disk on each use."""
    slot = offload_slot(model, name) if _is_meta(model.get_parameter(name)) else None
    if slot is None:
        return None
    loader_state = getattr(slot.storage, "state_dict", None)
    if isinstance(loader_state, dict) and isinstance(getattr(slot.storage, "index", None), dict):
        return loader_state.get(slot.key)
    return slot.storage[slot.key] if isinstance(slot.storage, dict) else None


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, when a hook says so."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _unreachable(name: str) -> KeditError:
    return KeditError(
        f"parameter {name!r} is on the meta device and is no weight accelerate offloaded: its value is nowhere "
        "to read or write (load the model with its weights, or dispatch it with accelerate)"
    )


def read_value(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``model``'s tensor ``name``) or, if it is an offloaded placeholder, its value."""
    if not _is_meta(tensor):
        return tensor
    slot = offload_slot(model, name)
    if slot is None:
        raise _unreachable(name)
    value = slot.read()  # as accelerate loads it: cast to the placeholder's dtype
    return value if value.dtype == tensor.dtype else value.to(tensor.dtype)


def write_value(model: nn.Module, name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into ``model``'s tensor ``name`` (``tensor``) where it lives: in place, and into
    accelerate's offload map where it is offloaded (so the next forward loads it)."""
    slot = offload_slot(model, name)
    if slot is None and _is_meta(tensor):
        raise _unreachable(name)
    with torch.no_grad():
        if not _is_meta(tensor):
            tensor.copy_(value)
        if slot is not None:
            current = slot.read()
            slot.write(value.detach().to(current.device, current.dtype).clone())


@contextlib.contextmanager
def onloaded(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Inside the block, the modules holding the offloaded tensors ``names`` keep real tensors (copies
    of the offloaded values, on their execution device) instead of ``meta`` placeholders, so that they
    can be trained; on exit the placeholders come back and the offloaded values are what they were
    (write through :func:`write_value` to change them)."""
    undo: list[tuple[Any, dict[tuple, torch.Tensor]]] = []
    try:
        for name in names:
            slot = offload_slot(model, name)
            if slot is None or any(slot.hook is h for h, _ in undo):
                continue
            undo.append((slot.hook, {}))
            _materialize(slot, undo[-1][1])
        yield
    finally:
        for hook, saved in reversed(undo):
            hook.offload = True
            for (module, kind, local), placeholder in saved.items():
                getattr(module, kind)[local] = placeholder


def _materialize(slot: OffloadSlot, saved: dict[tuple, torch.Tensor]) -> None:
    """Give every offloaded tensor of the slot's hook a real copy (the placeholders go into ``saved``);
    turn the hook's offloading off."""
    hook, owner = slot.hook, slot.owner
    device = execution_device(owner) or torch.device("cpu")
    modules = owner.named_modules() if getattr(hook, "place_submodules", False) else [("", owner)]
    for prefix, module in modules:
        for kind in ("_parameters", "_buffers"):
            for local, t in list(getattr(module, kind).items()):
                key = f"{prefix}.{local}" if prefix else local
                found = _storage(hook.weights_map, key) if _is_meta(t) else None
                if found is None:
                    continue
                value = found[0][found[1]].to(device, t.dtype).clone()
                saved[(module, kind, local)] = t
                getattr(module, kind)[local] = (
                    nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
                )
    hook.offload = False
