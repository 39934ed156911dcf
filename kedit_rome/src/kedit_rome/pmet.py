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

from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.request import EditRequest

from .common import Statistics
from .spread_edit import SpreadHyperparams, spread_edit


class PMETHyperparams(SpreadHyperparams):
    """PMET's knobs (see :class:`kedit_rome.spread_edit.SpreadHyperparams`)."""

    #: norm clamp of the attention vector, in units of the attention output's norm (default:
    #: ``clamp_norm_factor``, as for the FFN vector). Adam moves both vectors by about ``v_lr`` per
    #: coordinate a step, so the clamps decide how the change is shared: where the attention output
    #: is the larger one, the same factor lets the discarded attention vector carry most of it.
    attn_clamp_norm_factor: float | None = Field(default=None, gt=0)


class PMET(EditMethod):
    """MEMIT-style batched edits that write only the FFN part of the optimized hidden state."""

    name = "pmet"
    hparams_class = PMETHyperparams
    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_rome"

    def __init__(self) -> None:
        self.statistics = Statistics()

    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: PMETHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        attn_clamp = (
            hparams.clamp_norm_factor if hparams.attn_clamp_norm_factor is None else hparams.attn_clamp_norm_factor
        )
        return spread_edit(self.statistics, model, tokenizer, requests, hparams, arch, ctx, attn_clamp)
