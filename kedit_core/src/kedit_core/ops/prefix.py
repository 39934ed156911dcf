"""Layer-prefix caching: layers below an intervention never change inside an optimization loop.

ROME's v* loop and MEMIT's z loop run a few dozen forward+backward passes over the same inputs
while changing only a vector added at layer ``l``. The outputs of layers ``0 .. l-1`` are therefore
constant: :func:`cached_prefix` runs them once and, inside the ``with`` block, makes each of those
layers return its recorded output instead of computing it (the model's own forward -- masks,
position embeddings, the layers above -- is unchanged, so no architecture-specific code is needed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..architecture import ArchitectureSpec
from .hooks import stop_after


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(x) for x in out)
    return out


@contextlib.contextmanager
def cached_prefix(
    model: nn.Module,
    arch: ArchitectureSpec,
    n_layers: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Inside the block, layers ``[0, n_layers)`` replay the outputs they gave for these inputs.

    Every forward inside the block must use exactly ``input_ids``/``attention_mask``. Gradients do
    not flow into the cached layers (they are constants of the loop).
    """
    layers = arch.layer_list(model)
    n_layers = max(0, min(n_layers, len(layers)))
    if n_layers == 0:
        yield
        return
    recorded: dict[int, Any] = {}
    handles = []

    def recorder(i: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            recorded[i] = _detach(output)

        return hook

    try:
        for i in range(n_layers):
            handles.append(layers[i].register_forward_hook(recorder(i)))
        with torch.no_grad(), stop_after(layers[n_layers - 1]):
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(recorded) != n_layers:
        raise RuntimeError(f"prefix caching recorded {len(recorded)} of {n_layers} layers")
    with replay_layers(layers, recorded):
        yield


@contextlib.contextmanager
def replay_layers(layers: Any, recorded: dict[int, Any]) -> Iterator[None]:
    """Inside the block, ``layers[i]`` returns ``recorded[i]`` whatever its input (instance-level
    ``forward`` override; on exit the layer's own instance-level ``forward``, such as the wrapper
    accelerate installs on a dispatched model, comes back)."""
    patched: list[tuple[nn.Module, Any]] = []
    missing = object()
    try:
        for i, out in recorded.items():
            patched.append((layers[i], layers[i].__dict__.get("forward", missing)))
            layers[i].forward = lambda *a, _out=out, **k: _out  # type: ignore[method-assign]
        yield
    finally:
        for layer, previous in reversed(patched):
            if previous is missing:
                del layer.forward
            else:
                layer.forward = previous
