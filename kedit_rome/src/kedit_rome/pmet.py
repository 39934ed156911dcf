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

from .memit import MEMIT, MEMITHyperparams


class PMETHyperparams(MEMITHyperparams):
    """PMET's knobs (see :class:`kedit_rome.memit.MEMITHyperparams`)."""

    #: norm clamp of the attention vector, in units of the attention output's norm (default:
    #: ``clamp_norm_factor``, as for the FFN vector). Adam moves both vectors by about ``v_lr`` per
    #: coordinate a step, so the clamps decide how the change is shared: where the attention output
    #: is the larger one, the same factor lets the discarded attention vector carry most of it.
    attn_clamp_norm_factor: float | None = Field(default=None, gt=0)


class PMET(MEMIT):
    """MEMIT-style batched edits that write only the FFN part of the optimized hidden state."""

    name = "pmet"
    hparams_class = PMETHyperparams

    def attn_clamp(self, hparams: PMETHyperparams) -> float | None:
        return hparams.clamp_norm_factor if hparams.attn_clamp_norm_factor is None else hparams.attn_clamp_norm_factor
