"""Updating facts through the value slots of knowledge neurons (Dai et al. 2022, Sec. 5.1).

Each FFN intermediate neuron ``i`` writes the column ``FFN^(val)_i`` of the down-projection into
the residual stream. To change ``<h, r, t>`` into ``<h, r, t'>``::

    FFN^(val)_i  <-  FFN^(val)_i - lambda_1 * t + lambda_2 * t'

for every knowledge neuron ``i``, with ``t`` and ``t'`` the word embeddings of the old and the new
answer (here the output embeddings of their first tokens). One layer's update is rank one:
``delta = u m^T`` with ``u = lambda_2 t' - lambda_1 t`` and ``m`` the indicator of the layer's
neurons. In gated FFNs an activation can be negative; the update of such a slot is then negated
(``sign_by_activation``) so that the neuron still writes ``+t'`` into the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from kedit_core.ops.logits import head_weights


def answer_embedding(model: nn.Module, token_id: int) -> torch.Tensor:
    """The output (unembedding) vector of ``token_id``, float32."""
    return head_weights(model)[0][token_id].detach().float()


def value_slot_update(
    model: nn.Module,
    old_id: int | None,
    new_id: int,
    erase_scale: float,
    insert_scale: float,
) -> torch.Tensor:
    """``u = lambda_2 t' - lambda_1 t``: the vector added to each selected value slot."""
    u = insert_scale * answer_embedding(model, new_id)
    if old_id is not None and old_id != new_id:
        u = u - erase_scale * answer_embedding(model, old_id)
    return u


def rank_one_factors(
    u: torch.Tensor, neurons: list[int], d_ff: int, signs: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``a @ b`` the ``[out, in]`` update of one layer: ``a = u``, ``b`` = neuron mask.

    ``signs`` (one per neuron, +-1) orient each slot's update by its neuron's activation sign.
    """
    mask = torch.zeros(1, d_ff, dtype=u.dtype, device=u.device)
    mask[0, neurons] = torch.tensor(signs, dtype=u.dtype, device=u.device) if signs is not None else 1.0
    return u[:, None], mask
