"""Layer-prefix caching and layer-input capture.

An edit at layer ``l`` never changes what layers ``0..l-1`` compute on the edit's prompts, so the
optimization loop runs them once: their outputs are recorded, and while the loop runs those layers
are replaced by modules that return the recorded outputs. Each step then costs the layers from
``l`` up plus the logits at the target positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from kedit_core.architecture import ArchitectureSpec
from kedit_core.ops.logits import final_hidden
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once what is needed has been recorded."""


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns what the layer returned on the cached batch."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def replay_prefix(
    model: nn.Module, arch: ArchitectureSpec, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Iterator[None]:
    """Within the block, forwards of exactly ``input_ids`` skip layers ``0..layer-1``."""
    layers = arch.layer_list(model)
    if layer <= 0:
        yield
        return
    outputs: dict[int, Any] = {}

    def record(i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[i] = output
            if i == layer - 1:
                raise _Stop

        return hook

    handles = [layers[i].register_forward_hook(record(i)) for i in range(layer)]
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            final_hidden(model, input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    originals = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Replay(outputs[i])
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with (first positional argument or ``hidden_states``)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def inputs_at(
    model: nn.Module, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: list[int]
) -> torch.Tensor:
    """``[B, D]``: the input of ``module`` at ``positions[b]`` of each row (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(module_input(args, kwargs).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):
            final_hidden(model, input_ids, attention_mask)
    finally:
        handle.remove()
    x = seen[0]
    if x.ndim == 2:
        x = x.unsqueeze(0)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, torch.tensor(positions, device=x.device)].clone()
