"""The per-layer loop shared by MEMIT and PMET (MEMIT Alg. 1, lines 6-13).

For each critical layer ``l_i`` (ascending): re-measure what is still missing at the target site,
``z - h``; take this layer's share (:func:`kedit_rome.spread.share`), map it to an MLP-output
change through the post-MLP norm if the architecture has one (:func:`kedit_rome.spread.residual_to_mlp_output`);
solve the batched least squares with this layer's keys and second moment; apply the update so the
next layer sees it. The updates are removed again before returning (bit-exact, from saved copies).

How a layer's update is solved is the caller's :data:`LayerSolve`: MEMIT's least squares (Eq. 14) or
AlphaEdit's null-space projected one (:mod:`kedit_rome.ops.least_squares`). The keys each layer was
solved with come back with the updates (AlphaEdit keeps them for the edits that follow).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, weight_value, write_weight
from kedit_core.request import EditRequest

from .common import lowrank_or_dense
from .ops.keys import compute_keys_values, module_io_at, subject_positions
from .spread import residual_to_mlp_output, share

log = logging.getLogger(__name__)

#: a layer's update rule: ``(layer, keys [d_in, n], residuals [d_out, n]) -> (a, b)``, the factors of
#: ``Delta = a @ b`` in ``[out, in]`` orientation
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerUpdates:
    """What :func:`distribute` computed: the :class:`~kedit_core.edit.Edit` entries (``dense``,
    ``lowrank``, see :func:`kedit_rome.common.lowrank_or_dense`) and each layer's keys ``[n, d_in]``."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)


def hidden_at_subject(
    model: nn.Module, tokenizer: Any, arch: ArchitectureSpec, requests: Sequence[EditRequest], layer: int
) -> torch.Tensor:
    """``h_layer`` [n, d]: the output of ``layer`` at the subject's last token of each bare prompt."""
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    return module_io_at(
        model, tokenizer, prompts, subject_positions(tokenizer, prompts, subjects), arch.layer_path(layer), "output"
    )


def distribute(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    z: torch.Tensor,
    target_site: str,
    solve: LayerSolve,
    max_rotation: float = 0.5,
) -> LayerUpdates:
    """The updates that move ``target_site``'s output toward ``z`` [n, d], each layer's solved by ``solve``.

    With a post-MLP norm, every layer but the last adds at most ``max_rotation * ||N(m)||`` (its
    share is scaled down to that): a normalized MLP output can only turn, not grow, and asking a
    lower layer for a residual larger than its own output flips it and wrecks the model. The last
    layer then takes what is missing exactly, as it re-measures.
    """
    prompts = [r.prompt for r in requests]
    subjects = [r.subject for r in requests]
    lookup = subject_positions(tokenizer, prompts, subjects)
    saved: dict[str, torch.Tensor] = {}
    out = LayerUpdates()
    try:
        for i, layer in enumerate(layers):
            current = module_io_at(model, tokenizer, prompts, lookup, target_site, "output")
            r = share(z - current, len(layers) - i)
            keys, values = compute_keys_values(model, tokenizer, arch, layer, prompts, subjects, templates)
            norm = arch.module(model, layer, arch.post_mlp_norm) if arch.post_mlp_norm else None
            if norm is not None and i < len(layers) - 1:
                with torch.no_grad():
                    cap = max_rotation * norm(values).norm(dim=-1, keepdim=True)
                r = r * (cap / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            resid = residual_to_mlp_output(norm, values, r)
            a, b = solve(layer, keys.T, resid.T)
            out.keys[layer] = keys.detach()
            param = arch.mlp_out_param(layer)
            w = arch.weight(model, param)
            saved[param] = weight_value(model, param).detach().clone()
            with torch.no_grad():
                write_weight(model, param, arch.to_param_layout(w + (a.double() @ b.double()).to(w.device, w.dtype)))
            d, lr = lowrank_or_dense(arch, param, a, b)
            out.dense.update(d)
            out.lowrank.update(lr)
            log.info(
                "layer %d: missing %.3f, update norm %.3f (weight %.3f)",
                layer,
                float((z - current).norm(dim=1).mean()),
                float((a.double() @ b.double()).norm()),
                float(saved[param].norm()),
            )
    finally:
        for param, original in saved.items():
            write_weight(model, param, original)
    return out
