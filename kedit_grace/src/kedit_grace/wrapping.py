"""Installing and removing module wrappers -- how GRACE and MELO patches enter a model.

A wrapper replaces a module in its parent and calls the original (its ``base``) inside. The base is
not registered as a child: the wrapper re-registers the base's own parameters under the same names,
so ``model.state_dict()`` keys and parameter paths (``...mlp.down_proj.weight``, which patch
fingerprints name) are the same whether the module is wrapped or not. The wrapper's own tensors
(codebooks, adapters) are non-persistent buffers: they move with ``model.to()`` but never enter a
checkpoint of the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import get_module
from kedit_core.errors import PatchError


class ModuleWrapper(nn.Module):
    """Base class of the modules GRACE and MELO install around a layer."""

    #: identifies the patch state a wrapper holds (the patch id it was attached from)
    state_id: str = ""

    def __init__(self, base: nn.Module, state_id: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # deliberately not a registered child
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.state_id = state_id

    def _apply(self, fn: Any, recurse: bool = True) -> ModuleWrapper:
        self.base._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"base={type(self.base).__name__}, state_id={self.state_id!r}"


def split_path(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path``; returns the module that was there."""
    parent_path, name = split_path(path)
    parent = get_module(model, parent_path)
    old = getattr(parent, name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
    return old


def install(model: nn.Module, wrappers: dict[str, nn.Module]) -> Callable[[], None]:
    """Install wrappers at their paths at once; the returned callable puts back the exact module
    objects that were there (last-in-first-out with other patches)."""
    previous: dict[str, nn.Module] = {}
    try:
        for path, wrapper in wrappers.items():
            previous[path] = replace_module(model, path, wrapper)
    except Exception:
        for path, old in previous.items():
            replace_module(model, path, old)
        raise

    def uninstall() -> None:
        for path in previous:
            current = get_module(model, path)
            if current is not wrappers[path]:
                raise PatchError(f"module {path!r} was replaced by something else since the patch was applied")
        for path, old in previous.items():
            replace_module(model, path, old)

    return uninstall


def unwrap_base(current: nn.Module, cls: type[ModuleWrapper], supersedes: str) -> nn.Module:
    """The module a new wrapper should wrap.

    A patch computed on top of an applied patch of the same method carries the complete state and
    names that patch's state in ``supersedes``: it wraps the older wrapper's base instead of
    nesting. Anything else (no wrapper, another method's wrapper, an unrelated patch) is nested.
    """
    if isinstance(current, cls) and supersedes and current.state_id == supersedes:
        return current.base
    return current


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any stack of wrappers."""
    while isinstance(module, ModuleWrapper):
        module = module.base
    return module


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its storage is not 64-byte aligned. Tensors read from a patch file sit at
    arbitrary offsets, and a matmul on unaligned memory may round differently (~1e-8): the copy
    makes a saved patch reproduce the edited model bit for bit. Aligned tensors (the views a
    sequential run shares) are not copied."""
    return t if t.data_ptr() % 64 == 0 else t.clone()
