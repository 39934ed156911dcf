"""The GRACE adaptor: a codebook wrapped around one layer (Hartvigsen et al. 2023, Sec. 3).

    GRACE_l(h) = v_{i*}   if d(h, k_{i*}) <= eps_{i*}   (the codebook answers)
               = f_l(h)   otherwise                     (defer to the layer)

with keys ``k_i`` (the layer's input on an edited prompt's last token), values ``v_i`` (layer
outputs), deferral radii ``eps_i``. Which positions a hit covers is decided by
:func:`kedit_grace.codebook.route_positions`: the hit position and the ``span_i - 1`` after it,
where ``span_i`` is the number of tokens of the entry's answer -- the positions that predict the
answer. Later tokens run the layer unchanged, so generation goes on from the answer on its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codebook import DecodingState, Metric, route_positions
from ..wrapping import ModuleWrapper


class GraceAdaptor(ModuleWrapper):
    """Wraps a layer with a codebook of ``keys [K, D_in]``, ``values [K, D_out]``, ``radii [K]``
    and ``spans [K]`` (positions each entry answers, hit included; default 1, the hit alone)."""

    def __init__(
        self,
        base: nn.Module,
        keys: torch.Tensor,
        values: torch.Tensor,
        radii: torch.Tensor,
        labels: list[str],
        metric: Metric,
        state_id: str = "",
        spans: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base, state_id)
        if spans is None:
            spans = torch.ones(keys.shape[0], dtype=torch.long, device=keys.device)
        if spans.shape != (keys.shape[0],) or bool((spans < 1).any()):
            raise ValueError(f"spans must be {keys.shape[0]} positive counts, got {spans.tolist()}")
        self.register_buffer("keys", keys, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("radii", radii, persistent=False)
        self.register_buffer("spans", spans.long(), persistent=False)
        self.labels = list(labels)
        #: the edit prompts each entry answers (to re-fit a value when its ball expands)
        self.prompts: list[list[str]] = [[] for _ in labels]
        self.metric: Metric = metric
        #: while a value is optimized: ``(row, tensor)`` substituted for ``values[row]``
        self.trainable: tuple[int, torch.Tensor] | None = None
        #: set when attached to a model: carries hits across cached generation steps
        self.decoding: DecodingState | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def value_table(self) -> torch.Tensor:
        if self.trainable is None:
            return self.values
        row, value = self.trainable
        table = self.values.clone()
        table[row] = value.to(table.dtype)
        return table

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if len(self) == 0:
            return out
        batch = x.shape[0] if x.ndim == 3 else 1
        carry = self.decoding.carry(batch) if self.decoding is not None else None
        routing = route_positions(x, self.keys, self.radii, self.metric, carry=carry, spans=self.spans)
        if self.decoding is not None:
            self.decoding.update(routing)
        active = routing.active
        if not bool((active >= 0).any()):
            return out
        picked = self.value_table()[active.clamp(min=0)].to(out.dtype)
        return torch.where((active >= 0).unsqueeze(-1), picked.view_as(out), out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, entries={len(self)}, metric={self.metric!r}"
