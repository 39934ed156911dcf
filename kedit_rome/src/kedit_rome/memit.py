"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023).

1. per request, a target hidden state ``z_i = h_L + delta_i`` at the subject's last token of the
   last critical layer ``L`` (the value optimization of :mod:`kedit_rome.value` on the layer output);
2. for each critical layer ``l`` in order: keys ``K_l`` (template-averaged down-projection inputs),
   the missing residual ``(z - h_L)`` re-measured with the updates so far, its equal share for this
   layer (mapped through the MLP-output norm where the architecture has one, :mod:`kedit_rome.spread`),
   and the batched least-squares update ``Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1`` (Eq. 14),
   applied before the next layer is visited.

All updates are taken off the model again before returning (the Editor applies the patch).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.patch import Patch
from kedit_core.request import EditRequest

from .common import StatsOptions, make_patch, second_moment_for, templates_for
from .distribute import distribute
from .value import ValueOptions, optimize_values

log = logging.getLogger(__name__)


class MEMITHyperparams(Hyperparams, ValueOptions, StatsOptions):
    #: the critical layers whose MLP down-projections share the update (last one: where z is set)
    layers: list[int] = Field(default=[3, 4, 5, 6], min_length=1)
    #: lambda in ``lambda C + K K^T`` (C is the per-token mean second moment)
    mom2_update_weight: float = Field(default=15000.0, gt=0)
    batch_size: int = Field(default=1000, ge=1)


class MEMIT(EditMethod):
    """Batched edits spread over several MLP layers."""

    name = "memit"
    hparams_class = MEMITHyperparams
    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_rome"

    def compute_patch(self, model, tokenizer, requests: list[EditRequest], hparams: MEMITHyperparams,
                      arch: ArchitectureSpec, ctx: EditContext) -> Patch:
        layers = sorted(set(hparams.layers))
        top = layers[-1]
        templates = templates_for(model, tokenizer, hparams, ctx)
        stats = second_moment_for(model, tokenizer, arch, layers, hparams, ctx)
        site = arch.layer_path(top)
        result = optimize_values(model, tokenizer, arch, requests, templates, [site], top + 1, hparams)
        first = _first_rows(result.batch.owner[: result.batch.n_rewrite], len(requests))
        z = result.initial[0][first] + result.deltas[0]
        tensors = distribute(model, tokenizer, arch, requests, templates, layers, stats, z,
                             target_site=site, weight=hparams.mom2_update_weight)
        extra = {"z_steps": result.steps, "target_nll": result.nll}
        return make_patch(self, model, tensors, hparams, requests, ctx, extra)


def _first_rows(owner: torch.Tensor, n: int) -> torch.Tensor:
    """The first (bare-prompt) row of each request."""
    idx = torch.arange(len(owner), device=owner.device)
    out = torch.zeros(n, dtype=torch.long, device=owner.device)
    return out.scatter_reduce(0, owner, idx, reduce="amin", include_self=False)
