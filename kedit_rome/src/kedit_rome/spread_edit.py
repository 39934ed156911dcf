"""The MEMIT-style edit shared by MEMIT and PMET: free vectors at the last critical layer, a target
hidden state ``z`` per request, spread over the critical layers' FFN weights.

1. optimize free vectors added to ``sites`` of the last critical layer ``L`` (:mod:`kedit_rome.value`);
2. the FFN's part of the new hidden state: ``r = N(m + delta_m) - N(m)`` with ``delta_m`` the
   vector at the FFN output (``N`` = the post-MLP norm where the architecture has one, else
   identity; :func:`kedit_rome.spread.mlp_output_effect`), so ``z = h_L + r``;
3. ``z`` is written into the FFN weights of the critical layers (:func:`kedit_rome.distribute.distribute`).

MEMIT optimizes the FFN output alone; PMET optimizes the attention output jointly and discards it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext
from kedit_core.request import EditRequest

from .common import Statistics, StatsOptions
from .distribute import distribute, hidden_at_subject
from .spread import mlp_output_effect
from .value import ValueOptions, optimize_values_chunked


class SpreadHyperparams(Hyperparams, ValueOptions, StatsOptions):
    #: the critical layers whose MLP down-projections share the update (last one: where z is set)
    layers: list[int] = Field(default=[3, 4, 5, 6], min_length=1)
    #: lambda in ``lambda C + K K^T`` (C is the per-token mean second moment)
    mom2_update_weight: float = Field(default=15000.0, gt=0)
    batch_size: int = Field(default=1000, ge=1)
    #: requests whose free vectors are optimized together (they are independent; larger groups
    #: fill the passes better; memory grows by ~1 MB per request for the essence reference
    #: distribution)
    value_batch_size: int = Field(default=100, ge=1)


def spread_edit(
    statistics: Statistics,
    model: Any,
    tokenizer: Any,
    requests: list[EditRequest],
    hparams: SpreadHyperparams,
    arch: ArchitectureSpec,
    ctx: EditContext,
    attn_clamp: float | None = None,
) -> Edit:
    """Steps 1-3 above; with ``attn_clamp`` (PMET) a vector at the attention output is optimized too,
    its norm clamped to ``attn_clamp`` times the attention output's norm."""
    layers = sorted(arch.check_layers(model, hparams.layers, "layers"))
    top = layers[-1]
    templates = statistics.templates(model, tokenizer, hparams, ctx)
    stats = statistics.second_moment(model, tokenizer, arch, layers, hparams, ctx)
    sites, clamps = [arch.layer_path(top, arch.mlp_out)], [hparams.clamp_norm_factor]
    if attn_clamp is not None:
        sites, clamps = [arch.layer_path(top, arch.attn_out), *sites], [attn_clamp, *clamps]
    result = optimize_values_chunked(
        model, tokenizer, arch, requests, templates, sites, top, hparams, hparams.value_batch_size, clamps
    )
    norm = arch.module(model, top, arch.post_mlp_norm) if arch.post_mlp_norm else None
    ffn_change = mlp_output_effect(norm, result.initial[-1], result.deltas[-1])
    z = hidden_at_subject(model, tokenizer, arch, requests, top) + ffn_change
    dense, lowrank = distribute(
        model,
        tokenizer,
        arch,
        requests,
        templates,
        layers,
        stats,
        z,
        target_site=arch.layer_path(top),
        weight=hparams.mom2_update_weight,
    )
    extra = {
        "z_steps": result.steps,
        "target_nll": result.nll,
        "sites": sites,
        "site_output_norms": [float(x.norm(dim=1).mean()) for x in result.initial],
        "site_delta_norms": [float(d.norm(dim=1).mean()) for d in result.deltas],
    }
    return Edit(dense=dense, lowrank=lowrank, extra=extra)
