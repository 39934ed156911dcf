"""Suffix-only forward passes: positions before an intervention never change inside a loop.

In ROME's v* loop (and MEMIT's z loop) a free vector is added at the subject's last token ``p_r``
of row ``r``, at layer ``l``. In a causal model nothing at positions ``< p_r`` depends on it, at any
layer, and nothing below layer ``l`` depends on it at all. So for each row::

    h_{>=l}[t] = f(h_{<l}[p_r:], K/V[: p_r])   for t >= p_r

:class:`SuffixForward` runs the prefix ``x[:p_r]`` once (no gradient) into a KV cache, records
the outputs of the layers below ``l`` for the suffix ``x[p_r:]`` once, and then each call runs
only the suffix through the layers ``>= l``, attending to the cached keys/values. The prefixes are
left-padded to one width and the suffixes right-padded, with explicit position ids, so every token
keeps the position (and the attention pattern) it has in the full sequence. Only the model's own
forward and its public cache object are used -- no architecture-specific code.

With a 10-token context template and the subject near the end of the prompt, the suffix is a
quarter of the sequence: the layers above ``l`` do a quarter of the work, forward and backward.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.ops.hooks import StopForward, stopped
from kedit_core.ops.prefix import replay_layers


def cache_kwarg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``cache=`` where the model's forward takes it (transformers 5), else ``past_key_values=``."""
    params = inspect.signature(model.base_model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def returned_cache(out: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned (renamed in transformers 5)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _select(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, tuple):
        return tuple(_select(v, rows) for v in value)
    return value


class SuffixForward:
    """Final hidden states of positions ``split[r]..`` of each row, the earlier positions cached.

    ``input_ids``/``attention_mask``: a right-padded batch ``[B, T]``; ``split[r]``: the first
    position of row ``r`` that must be recomputed (the intervention's position). Layers
    ``[0, frozen_layers)`` are replayed for the suffix too. Call the object for ``[B, S, H]``:
    column ``j`` of row ``r`` is position ``split[r] + j`` (see :meth:`columns`).
    """

    def __init__(
        self,
        model: nn.Module,
        arch: ArchitectureSpec,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        split: torch.Tensor,
        frozen_layers: int = 0,
    ) -> None:
        self.model, self.arch = model, arch
        device = input_ids.device
        split = split.to(device).long()
        lengths = attention_mask.long().sum(1)
        if bool((split >= lengths).any()) or bool((split < 0).any()):
            raise ValueError("each split position must lie inside its row")
        self.split = split
        width_p = int(split.max())
        width_s = int((lengths - split).max())
        rows = torch.arange(input_ids.shape[0], device=device)
        # prefix, left-padded: column c of row r holds position c - (P - split[r])
        col_p = torch.arange(width_p, device=device)[None, :] - (width_p - split)[:, None]
        valid_p = col_p >= 0
        self.prefix_ids = torch.where(valid_p, input_ids[rows[:, None], col_p.clamp_min(0)], 0)
        # suffix, right-padded: column j of row r holds position split[r] + j
        col_s = split[:, None] + torch.arange(width_s, device=device)[None, :]
        valid_s = col_s < lengths[:, None]
        col_s = col_s.clamp(max=input_ids.shape[1] - 1)
        self.suffix_ids = torch.where(valid_s, input_ids[rows[:, None], col_s], 0)
        self.suffix_pos = torch.where(valid_s, col_s, 0)
        self.prefix_pos = col_p.clamp_min(0)
        self.mask = torch.cat([valid_p, valid_s], 1).long()
        self.width_p = width_p
        self.frozen_layers = max(0, min(frozen_layers, len(arch.layer_list(model))))
        self.cache = self._prefix_cache() if width_p else None
        self.recorded = self._record_frozen() if self.frozen_layers else {}
        self._drop_frozen_entries()

    def columns(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Suffix columns of (row, position) pairs of the original batch."""
        return positions.to(self.split.device) - self.split[rows.to(self.split.device)]

    def _forward_kwargs(self, cache: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "input_ids": self.suffix_ids,
            "attention_mask": self.mask,
            "position_ids": self.suffix_pos,
            "use_cache": cache is not None,
        }
        if cache is not None:
            kw.update(cache_kwarg(self.model, cache))
        return kw

    @torch.no_grad()
    def _prefix_cache(self) -> Any:
        out = self.model.base_model(
            input_ids=self.prefix_ids,
            attention_mask=self.mask[:, : self.width_p],
            position_ids=self.prefix_pos,
            use_cache=True,
        )
        return returned_cache(out)

    def _drop_frozen_entries(self) -> None:
        """Once recorded, the frozen layers are replayed and never attend: keep their cache entries'
        shapes (the cache's length is read from them) but not their contents."""
        for layer in list(getattr(self.cache, "layers", []))[: self.frozen_layers]:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.ndim == 4:
                    setattr(layer, name, t.new_zeros(()).expand(t.shape))  # no storage

    def _fresh_cache(self) -> Any:
        return copy.deepcopy(self.cache) if self.cache is not None else None

    @torch.no_grad()
    def _record_frozen(self) -> dict[int, Any]:
        layers = self.arch.layer_list(self.model)
        recorded: dict[int, Any] = {}

        def recorder(i: int) -> Any:
            def hook(_m: nn.Module, _args: Any, output: Any) -> None:
                recorded[i] = (
                    output.detach()
                    if isinstance(output, torch.Tensor)
                    else tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
                )
                if i == self.frozen_layers - 1:
                    raise StopForward

            return hook

        handles = [layers[i].register_forward_hook(recorder(i)) for i in range(self.frozen_layers)]
        try:
            with stopped():
                self.model.base_model(**self._forward_kwargs(self._fresh_cache()))
        finally:
            for h in handles:
                h.remove()
        if len(recorded) != self.frozen_layers:
            raise RuntimeError(f"recorded {len(recorded)} of {self.frozen_layers} frozen layers")
        return recorded

    def __call__(self) -> torch.Tensor:
        """``[B, S, H]`` last hidden states (after the final norm) of the suffix positions."""
        with replay_layers(self.arch.layer_list(self.model), self.recorded):
            out = self.model.base_model(**self._forward_kwargs(self._fresh_cache()))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def select(self, rows: torch.Tensor) -> SuffixForward:
        """The same computation restricted to ``rows`` (no forward is run)."""
        new = copy.copy(self)
        rows = rows.to(self.split.device)
        for name in ("split", "suffix_ids", "suffix_pos", "mask", "prefix_ids", "prefix_pos"):
            setattr(new, name, getattr(self, name).index_select(0, rows))
        if self.cache is not None:
            new.cache = copy.deepcopy(self.cache)
            new.cache.batch_select_indices(rows)
            new._drop_frozen_entries()
        new.recorded = {i: _select(v, rows) for i, v in self.recorded.items()}
        return new
