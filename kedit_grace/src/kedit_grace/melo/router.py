"""MELO's key index (Yu et al. 2024, Sec. 3.2): which LoRA block, if any, serves an input.

The index stores one key per edit -- the hidden state entering the router layer's attention (the
normalized residual stream) at the edit prompt's last token -- with a radius and the block that
learned the edit. A query is routed by :func:`kedit_grace.codebook.route`:

    block(t) = b_{i*}  if d(h_t, k_{i*}) <= r_{i*}  (nearest key, held for the rest of the sequence)
             = none    otherwise                     (the base model runs unchanged)

The router runs as a forward pre-hook on the router layer's attention, before any LoRA block of the
same forward can change its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codebook import Metric, route
from ..prefix import module_input


class MeloRouter:
    """Keys ``[K, H]``, radii ``[K]`` and block ids ``[K]``; ``active`` is the routing of the
    current forward (``[B, T]`` block ids, ``-1`` for none)."""

    def __init__(self, keys: torch.Tensor, radii: torch.Tensor, blocks: torch.Tensor, metric: Metric,
                 state_id: str = "") -> None:
        self.keys, self.radii, self.blocks, self.metric = keys, radii, blocks.long(), metric
        self.state_id = state_id
        self.enabled = True
        self.active: torch.Tensor | None = None
        self._handle: Any = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def compute(self, hidden: torch.Tensor) -> torch.Tensor:
        entries = route(hidden, self.keys, self.radii, self.metric)
        blocks = self.blocks.to(entries.device)
        return torch.where(entries >= 0, blocks[entries.clamp(min=0)], torch.full_like(entries, -1))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.active = self.compute(module_input(args, kwargs)) if self.enabled and len(self) else None

    def attach_to(self, module: nn.Module) -> None:
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.active = None

    def to(self, device: torch.device) -> MeloRouter:
        self.keys, self.radii, self.blocks = self.keys.to(device), self.radii.to(device), self.blocks.to(device)
        return self
