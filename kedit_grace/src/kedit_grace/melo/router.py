"""MELO's key index (Yu et al. 2024, Sec. 3.2): which LoRA block, if any, serves an input.

The index stores one key per edit -- the hidden state entering the router layer's attention (the
normalized residual stream) at the edit prompt's last token -- with a radius, the block that
learned the edit and the edit's span (the tokens of its answer, :func:`kedit_grace.keys.answer_span`).
A query is routed by :func:`kedit_grace.codebook.route_positions`:

    block(t) = b_{i*(s)}  if position s <= t hit key i*(s) (d(h_s, k_{i*}) <= r_{i*}, nearest key)
                          and t - s < span_{i*(s)}
             = none       otherwise (the base model runs unchanged)

so a block serves the positions that predict its edit's answer -- teacher-forced, or generated one
at a time from the KV cache -- and the text after the answer runs the base model (issue 16: a block
held for the rest of the sequence made greedy generation repeat the target). Without spans a hit
holds for the rest of the sequence.

The router runs as a forward pre-hook on the router layer's attention, before any LoRA block of the
same forward can change its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_core.ops.hooks import module_input

from ..codebook import DecodingState, Metric, route_positions


class MeloRouter:
    """Keys ``[K, H]``, radii ``[K]``, block ids ``[K]`` and answer spans ``[K]`` (``None``: a hit
    holds for the rest of the sequence); ``active`` is the routing of the current forward
    (``[B, T]`` block ids, ``-1`` for none)."""

    def __init__(
        self,
        keys: torch.Tensor,
        radii: torch.Tensor,
        blocks: torch.Tensor,
        metric: Metric,
        state_id: str = "",
        spans: torch.Tensor | None = None,
    ) -> None:
        self.keys, self.radii, self.blocks, self.metric = keys, radii, blocks.long(), metric
        if spans is not None and tuple(spans.shape) != (int(keys.shape[0]),):
            raise ValueError(f"{keys.shape[0]} keys need {keys.shape[0]} answer spans, got {tuple(spans.shape)}")
        self.spans = None if spans is None else spans.long()
        self.state_id = state_id
        self.enabled = True
        self.active: torch.Tensor | None = None
        self._handle: Any = None
        #: set when attached to a model: carries routing across cached generation steps
        self.decoding: DecodingState | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def compute(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0] if hidden.ndim == 3 else 1
        carry = self.decoding.carry(batch) if self.decoding is not None else None
        routing = route_positions(hidden, self.keys, self.radii, self.metric, carry=carry, spans=self.spans)
        if self.decoding is not None:
            self.decoding.update(routing)
        entries = routing.active
        blocks = self.blocks.to(entries.device)
        return torch.where(entries >= 0, blocks[entries.clamp(min=0)], torch.full_like(entries, -1))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.active = self.compute(module_input(args, kwargs)) if self.enabled and len(self) else None

    def attach_to(self, module: nn.Module, model: nn.Module | None = None) -> None:
        """Route on ``module``'s input; with ``model``, also follow cached generation."""
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)
        if model is not None:
            self.decoding = DecodingState().attach(model)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.decoding is not None:
            self.decoding.detach()
            self.decoding = None
        self.active = None

    def to(self, device: torch.device) -> MeloRouter:
        self.keys, self.radii, self.blocks = self.keys.to(device), self.radii.to(device), self.blocks.to(device)
        if self.spans is not None:
            self.spans = self.spans.to(device)
        return self
