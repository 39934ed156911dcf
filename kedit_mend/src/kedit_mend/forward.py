"""Forward passes used while training an editor.

- :func:`edited_forward`: the model with ``W + Δ`` for low-rank ``Δ = A B``, differentiable in
  ``A`` and ``B`` (a forward hook adds ``(x Bᵀ) Aᵀ`` to the module's output, so ``W`` is never
  written). Each row of the batch can have its own ``Δ`` (one edit, or one group of edits, per row).
- :func:`start_from_layer`: run only layers ``start..`` from cached hidden states. An edit of the
  last layers leaves the earlier ones unchanged, so their output is computed once per training
  record and reused; the model still builds its own masks and position embeddings, the layers
  before ``start`` are replaced by pass-throughs for the duration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_module

from .gradient_factors import module_of


@dataclass
class LowRankUpdate:
    """``Δ = a @ b`` in ``[out, in]`` form; ``owner[r]``: the edit group of rank-one term ``r``."""

    a: torch.Tensor  # [out, R]
    b: torch.Tensor  # [R, in]
    owner: torch.Tensor  # [R] long


@contextlib.contextmanager
def edited_forward(
    model: nn.Module, updates: dict[str, LowRankUpdate], row_owner: torch.Tensor | None = None
) -> Iterator[None]:
    """Inside the block, module ``m`` computes ``W x + Δ_{g(row)} x``; ``row_owner[i]``: the group of row ``i``.

    Without ``row_owner`` every term applies to every row (one joint edit).
    """
    handles = []

    def hook_for(up: LowRankUpdate) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            coef = x.to(up.b.dtype) @ up.b.T  # [B, T, R]
            if row_owner is not None:
                mask = (row_owner.to(up.owner.device)[:, None] == up.owner[None, :]).to(coef.dtype)  # [B, R]
                coef = coef * mask[:, None, :]
            return out + (coef @ up.a.T).to(out.dtype)

        return hook

    try:
        for param, up in updates.items():
            handles.append(get_module(model, module_of(param)).register_forward_hook(hook_for(up)))
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden_arg(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def start_from_layer(model: nn.Module, arch: ArchitectureSpec, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Layers ``< start`` are skipped and layer ``start`` reads ``hidden`` (``[B, T, H]``, its input)."""
    if start <= 0:
        yield
        return
    layers = arch.layer_list(model)

    def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _hidden_arg(args, kwargs)

    def inject(*args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden.to(_hidden_arg(args, kwargs).dtype)

    try:
        for i in range(start):
            layers[i].forward = inject if i == start - 1 else passthrough  # instance attribute shadows the method
        yield
    finally:
        for i in range(start):
            layers[i].__dict__.pop("forward", None)


@contextlib.contextmanager
def capture_layer_input(model: nn.Module, arch: ArchitectureSpec, start: int) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states entering layer ``start`` (one tensor per forward)."""
    seen: list[torch.Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append(_hidden_arg(args, kwargs).detach())

    handle = get_module(model, arch.layer_path(start)).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
