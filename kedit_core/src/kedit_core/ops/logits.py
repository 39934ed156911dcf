"""Logits only where they are needed: the lm_head of a 262k-token vocabulary dominates a forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architecture import weight_value
from ..offload import execution_device


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any
) -> torch.Tensor:
    """Last hidden states (after the final norm), ``[B, T, H]``, without computing logits."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the output embedding (and Gemma's logit soft-capping, where configured)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight ``[V, H]`` and bias (None where it has none), as values
    (:func:`~kedit_core.architecture.weight_value`: read through accelerate's offload map)."""
    head = model.get_output_embeddings()
    path = next(name for name, module in model.named_modules() if module is head)
    prefix = f"{path}." if path else ""
    bias = weight_value(model, f"{prefix}bias") if getattr(head, "bias", None) is not None else None
    return weight_value(model, f"{prefix}weight"), bias


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits at positions ``(rows[k], cols[k])`` only: ``[K, V]``."""
    hidden = final_hidden(model, input_ids, attention_mask)
    return head_logits(model, hidden[rows.to(hidden.device), cols.to(hidden.device)])


def next_token_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits ``[V]`` of the token after one unpadded sequence of token ids."""
    x = torch.tensor(ids, device=model_device(model))[None]
    return head_logits(model, final_hidden(model, x, torch.ones_like(x))[:, -1])[0]


def model_device(model: nn.Module) -> torch.device:
    """The device of the input embedding (where input ids must go): where accelerate runs it, in a
    dispatched model (``device_map``; its weight may be offloaded), else where its weight is."""
    embed = model.get_input_embeddings()
    return execution_device(embed) or embed.weight.device
