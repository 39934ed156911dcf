"""Knowledge attribution by integrated gradients (Dai et al. 2022, Sec. 3.2).

For the intermediate neuron ``w_i^(l)`` of the FFN at layer ``l`` (the input of the
down-projection, at the position that predicts the answer), with ``w_bar`` its value on the prompt::

    Attr(w_i^(l)) = w_bar_i^(l) * integral_0^1 dP_x(alpha * w_bar_i^(l)) / dw_i^(l) dalpha          (Eq. 2)
                 ~ (w_bar_i^(l) / m) * sum_{k=1..m} dP_x(k/m * w_bar_i^(l)) / dw_i^(l)                (Eq. 3)

where ``P_x(w_hat)`` is the probability of the correct answer when the layer's neurons are set to
``w_hat``. All neurons of a layer are scaled together (the gradient of Eq. 3 is taken for the
whole layer at once). One batched forward/backward covers many (layer, step) rows: row ``(l, k)``
replaces the layer-``l`` activation by ``k/m * w_bar^(l)`` and leaves the other layers alone.

Only the last position is intervened on, and in a causal model the earlier positions do not see it:
their keys and values are computed once (a KV cache of the prompt's prefix, repeated over the
rows), and each row runs the last token alone -- about ``T`` times less work than full rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.ops.logits import final_hidden, model_device

from ..ops.head_loss import head_loss
from ..ops.suffix import cache_kwarg, returned_cache


@torch.no_grad()
def neuron_activations(model: nn.Module, arch: ArchitectureSpec, ids: list[int], layers: list[int]) -> torch.Tensor:
    """``w_bar``: the down-projection inputs at the last position, ``[len(layers), d_ff]``."""
    acts: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(module: nn.Module, inputs: Any) -> None:
            acts[layer] = inputs[0][0, -1].detach().float()

        return hook

    handles = [arch.module(model, layer, arch.mlp_out).register_forward_pre_hook(grab(layer)) for layer in layers]
    try:
        x = torch.tensor(ids, device=model_device(model))[None]
        final_hidden(model, x, torch.ones_like(x))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([acts[layer] for layer in layers])


def integrated_gradients(
    model: nn.Module,
    arch: ArchitectureSpec,
    ids: list[int],
    answer_id: int,
    layers: list[int],
    steps: int = 20,
    rows_per_pass: int = 120,
) -> torch.Tensor:
    """Attribution scores of Eq. 3 for every neuron of ``layers``: ``[len(layers), d_ff]`` (float32)."""
    base = neuron_activations(model, arch, ids, layers)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=base.device) / steps
    layers_per_pass = max(1, rows_per_pass // steps)
    grads = []
    for lo in range(0, len(layers), layers_per_pass):
        group = list(range(lo, min(len(layers), lo + layers_per_pass)))
        grads.append(_mean_gradients(model, arch, ids, answer_id, [layers[j] for j in group], base[group], alphas))
    return base * torch.cat(grads)


@torch.no_grad()
def prefix_cache(model: nn.Module, ids: list[int], rows: int) -> Any:
    """KV cache of ``ids[:-1]`` repeated ``rows`` times (``None`` for a one-token prompt)."""
    if len(ids) < 2:
        return None
    x = torch.tensor(ids[:-1], device=model_device(model))[None]
    out = model.base_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(rows)
    return cache


def _mean_gradients(model, arch, ids, answer_id, layers, base, alphas) -> torch.Tensor:
    """Mean over k of dP/dw at ``alpha_k * w_bar`` for each layer of the group: ``[len(layers), d_ff]``."""
    steps = len(alphas)
    device = model_device(model)
    scaled = (alphas[None, :, None] * base[:, None, :]).detach().requires_grad_(True)  # [L, m, d_ff]

    def replace(slot: int):
        rows = torch.arange(slot * steps, (slot + 1) * steps)

        def hook(module: nn.Module, inputs: Any) -> tuple:
            h = inputs[0].clone()
            h[rows.to(h.device), -1] = scaled[slot].to(h.device, h.dtype)
            return (h, *inputs[1:])

        return hook

    rows = len(layers) * steps
    cache = prefix_cache(model, ids, rows)
    handles = [
        arch.module(model, layer, arch.mlp_out).register_forward_pre_hook(replace(i)) for i, layer in enumerate(layers)
    ]
    try:
        x = torch.tensor(ids if cache is None else ids[-1:], device=device)[None].expand(rows, -1)
        mask = torch.ones(rows, len(ids), dtype=torch.long, device=device)
        with torch.enable_grad():
            if cache is None:
                hidden = final_hidden(model, x, mask)[:, -1]
            else:
                hidden = model.base_model(
                    input_ids=x, attention_mask=mask, **cache_kwarg(model, cache), use_cache=True
                ).last_hidden_state[:, -1]
            nll = head_loss(model, hidden, torch.full((rows,), answer_id, device=hidden.device))
            prob = torch.exp(-nll)  # P(answer), through the output layer in one pass (kedit_rome.ops.head_loss)
            (grad,) = torch.autograd.grad(prob.sum(), scaled)
    finally:
        for h in handles:
            h.remove()
    return grad.float().mean(1)
