"""PMET: Precise Model Editing in a Transformer (Li et al. 2024).

PMET observes that a layer's hidden state mixes the attention output, the FFN output and the
residual, and that only the FFN part should be written into FFN weights. So:

1. per request, two vectors are optimized jointly at the last critical layer ``L`` -- ``delta_a``
   added to the attention output and ``delta_m`` added to the FFN (down-projection) output, at the
   subject's last token (:mod:`kedit_rome.value`, with both sites);
2. ``delta_a`` is discarded; the FFN's share of the new hidden state is
   ``r = N(m + delta_m) - N(m)`` (``N`` = the post-MLP norm where the architecture has one, else
   identity), so the target is ``z = h_L + r``;
3. ``z`` is spread over the critical layers' FFN weights with MEMIT's least squares
   (:mod:`kedit_rome.distribute`).
"""

from __future__ import annotations

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


class PMETHyperparams(Hyperparams, ValueOptions, StatsOptions):
    layers: list[int] = Field(default=[3, 4, 5, 6], min_length=1)
    mom2_update_weight: float = Field(default=15000.0, gt=0)
    batch_size: int = Field(default=1000, ge=1)
    #: requests whose free vectors are optimized together (they are independent; bounds memory)
    value_batch_size: int = Field(default=8, ge=1)


class PMET(EditMethod):
    """MEMIT-style batched edits that write only the FFN part of the optimized hidden state."""

    name = "pmet"
    hparams_class = PMETHyperparams
    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_rome"

    def compute_patch(self, model, tokenizer, requests: list[EditRequest], hparams: PMETHyperparams,
                      arch: ArchitectureSpec, ctx: EditContext) -> Patch:
        layers = sorted(set(hparams.layers))
        top = layers[-1]
        templates = templates_for(model, tokenizer, hparams, ctx)
        stats = second_moment_for(model, tokenizer, arch, layers, hparams, ctx)
        sites = [arch.layer_path(top, arch.attn_out), arch.layer_path(top, arch.mlp_out)]
        result = optimize_values_chunked(model, tokenizer, arch, requests, templates, sites, top, hparams,
                                         hparams.value_batch_size)
        norm = arch.module(model, top, arch.post_mlp_norm) if arch.post_mlp_norm else None
        ffn_change = mlp_output_effect(norm, result.initial[1], result.deltas[1])
        h = hidden_at_subject(model, tokenizer, arch, requests, top)
        tensors = distribute(model, tokenizer, arch, requests, templates, layers, stats, h + ffn_change,
                             target_site=arch.layer_path(top), weight=hparams.mom2_update_weight)
        extra = {"z_steps": result.steps, "target_nll": result.nll}
        return make_patch(self, model, tensors, hparams, requests, ctx, extra)
