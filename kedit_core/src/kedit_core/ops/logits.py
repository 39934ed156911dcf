"""Logits only where they are needed: the lm_head of a 262k-token vocabulary dominates a forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def model_device(model: nn.Module) -> torch.device:
    """The device of the input embedding (where input ids must go)."""
    return model.get_input_embeddings().weight.device
