"""WISE's side memory and its router (Wang et al. 2024, Sec. 2.3): a copy ``W_v'`` of one MLP value
matrix (the down-projection) beside the main memory ``W_v``, used where the activation says an
input is about an edit.

For the wrapped layer's input ``a_t`` (the MLP activation at position ``t``):

    Delta_act(a_t) = || a_t (W_v' - W_v)^T ||_2                       (the routing activation score)
    hit(t)         = Delta_act(a_t) > eps                            (eps: :func:`.routing.threshold`)
    out(t)         = a_t W_v'^T + b   at the positions a hit covers   (side memory)
                   = f(a_t)           elsewhere                      (main memory, the unchanged layer)

kedit scores each position on its own token, and a hit covers its edit's answer span like a
GRACE hit (:func:`kedit_grace.codebook.spread_hits`): the edit whose key (its prompt's last-token
activation) is nearest to the hit decides how many positions -- the hit and the tokens of its
answer, teacher-forced or generated from the KV cache -- use the side memory; later tokens are
routed on their own scores. The paper instead scores a whole input (the mean over its tokens) and
routes every token of it; scoring per position keeps a cached decoding step's routing the same as
in the teacher-forced forward, and leaves every position that no edit covers on the main memory,
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..codebook import DecodingState, nearest, spread_hits
from ..wrapping import ModuleWrapper


class SideMemory(ModuleWrapper):
    """Wraps a value matrix (``nn.Linear``, or GPT-2's ``Conv1D`` when ``conv1d``) with a side memory
    ``weight [out, in]``, the edits' ``keys [K, in]`` and answer ``spans [K]``, and the routing
    threshold ``eps``."""

    def __init__(
        self,
        base: nn.Module,
        weight: torch.Tensor,
        keys: torch.Tensor,
        spans: torch.Tensor,
        threshold: float,
        conv1d: bool = False,
        state_id: str = "",
    ) -> None:
        super().__init__(base, state_id)
        if spans.shape != (keys.shape[0],) or bool((spans < 1).any()):
            raise ValueError(f"spans must be {keys.shape[0]} positive counts, got {spans.tolist()}")
        self.register_buffer("side_weight", weight, persistent=False)
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("spans", spans.long(), persistent=False)
        self.threshold = float(threshold)
        self.conv1d = conv1d
        #: the ``[prompt, target]`` of each edit the side memory holds
        self.members: list[list[str]] = []
        #: while the side memory is trained: ``W_v'`` as a function of the trainable tensor
        self.trainable: Callable[[], torch.Tensor] | None = None
        #: while the side memory is trained: ``[B, T]`` positions that use it (no routing)
        self.forced: torch.Tensor | None = None
        #: set when attached to a model: carries hits across cached generation steps
        self.decoding: DecodingState | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def main_weight(self) -> torch.Tensor:
        """``W_v`` as ``[out, in]``."""
        w = self.base.weight
        return w.T if self.conv1d else w

    def memory(self) -> torch.Tensor:
        """``W_v'`` as ``[out, in]``."""
        return self.trainable() if self.trainable is not None else self.side_weight

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``Delta_act`` of every position of ``x`` (``[..., in]`` -> ``[...]``, float32)."""
        delta = self.memory().float() - self.main_weight().float()
        return (x.float() @ delta.T).norm(dim=-1)

    def routed(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` (or ``[T]``): positions that read the side memory; ``None`` where none do."""
        if self.forced is not None:
            return self.forced if tuple(self.forced.shape) == tuple(x.shape[:-1]) else None
        if len(self) == 0:
            return None
        squeeze = x.ndim == 2
        xs = x.unsqueeze(0) if squeeze else x
        b, t, _ = xs.shape
        carry = self.decoding.carry(b) if self.decoding is not None else None
        hit = self.scores(xs.detach()) > self.threshold
        entry = torch.zeros((b, t), dtype=torch.long, device=x.device)
        if bool(hit.any()):
            _, idx = nearest(xs.detach()[hit].float(), self.keys, "euclidean")
            entry[hit] = idx
        routing = spread_hits(hit, entry, (b, t), x.device, carry, self.spans)
        if self.decoding is not None:
            self.decoding.update(routing)
        active = routing.active >= 0
        return active[0] if squeeze else active

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        active = self.routed(x)
        if active is None or not bool(active.any()):
            return out
        bias = getattr(self.base, "bias", None)
        side = torch.nn.functional.linear(x, self.memory().to(x.dtype), bias)
        return torch.where(active.unsqueeze(-1), side.to(out.dtype), out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, edits={len(self)}, threshold={self.threshold:.4g}"
