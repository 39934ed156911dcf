"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023).

1. per request, a target hidden state ``z_i`` at the subject's last token of the last critical
   layer ``L``. MEMIT adds the free vector to the layer's output; here it is added to layer ``L``'s
   MLP output ``m`` (:mod:`kedit_rome.value`), and ``z_i = h_L + N(m + delta_i) - N(m)``. Where the
   MLP output joins the residual unchanged (``N`` = identity: GPT-2, GPT-J, LLaMA) the two are the
   same thing; where it is normalized first (Gemma 2/3), a free residual-stream vector can ask for
   changes no MLP can make -- measured here: ``||z - h_L|| ~ 180`` at layer 6 of Gemma 3 270M,
   growing to ~420 while being spread, 0/10 edits -- while this ``z`` is reachable by construction;
2. for each critical layer ``l`` in order: keys ``K_l`` (template-averaged down-projection inputs),
   the missing residual ``(z - h_L)`` re-measured with the updates so far, its equal share for this
   layer (mapped through the MLP-output norm where the architecture has one, :mod:`kedit_rome.spread`),
   and the batched least-squares update ``Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1`` (Eq. 14),
   applied before the next layer is visited.

All updates are taken off the model again before returning (the Editor applies the patch).

On Gemma 3 270M spreading over several layers still fails (each lower layer can only turn its
normalized output; see :func:`kedit_rome.distribute.distribute` and the preset's comments), so its
preset uses one critical layer -- the batched least squares of Eq. 14 at a single layer.
"""

from __future__ import annotations

import logging

from kedit_core.architecture import ArchitectureSpec
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from pydantic import Field

from .common import StatsOptions, make_patch, second_moment_for, templates_for
from .distribute import distribute, hidden_at_subject
from .spread import mlp_output_effect
from .value import ValueOptions, optimize_values_chunked

log = logging.getLogger(__name__)


class MEMITHyperparams(Hyperparams, ValueOptions, StatsOptions):
    #: the critical layers whose MLP down-projections share the update (last one: where z is set)
    layers: list[int] = Field(default=[3, 4, 5, 6], min_length=1)
    #: lambda in ``lambda C + K K^T`` (C is the per-token mean second moment)
    mom2_update_weight: float = Field(default=15000.0, gt=0)
    batch_size: int = Field(default=1000, ge=1)
    #: requests whose free vectors are optimized together (they are independent; bounds memory)
    value_batch_size: int = Field(default=8, ge=1)


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
        site = arch.layer_path(top, arch.mlp_out)
        result = optimize_values_chunked(model, tokenizer, arch, requests, templates, [site], top, hparams,
                                         hparams.value_batch_size)
        norm = arch.module(model, top, arch.post_mlp_norm) if arch.post_mlp_norm else None
        effect = mlp_output_effect(norm, result.initial[0], result.deltas[0])
        z = hidden_at_subject(model, tokenizer, arch, requests, top) + effect
        tensors = distribute(model, tokenizer, arch, requests, templates, layers, stats, z,
                             target_site=arch.layer_path(top), weight=hparams.mom2_update_weight)
        extra = {"z_steps": result.steps, "target_nll": result.nll}
        return make_patch(self, model, tensors, hparams, requests, ctx, extra)
