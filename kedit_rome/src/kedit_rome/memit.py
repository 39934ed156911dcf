"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023).

1. per request, a target hidden state ``z_i`` at the subject's last token of the last critical
   layer ``L``. MEMIT adds the free vector to the layer's output; here it is added to layer ``L``'s
   MLP output ``m`` (:mod:`kedit_rome.value`), and ``z_i = h_L + N(m + delta_i) - N(m)``. Where the
   MLP output joins the residual unchanged (``N`` = identity: GPT-2, GPT-J, LLaMA) the two are the
   same thing; where it is normalized first (Gemma 2/3), a free residual-stream vector can ask for
   changes no MLP can make, while this ``z`` is reachable by construction;
2. for each critical layer ``l`` in order: keys ``K_l`` (template-averaged down-projection inputs),
   the missing residual ``(z - h_L)`` re-measured with the updates so far, its equal share for this
   layer (mapped through the MLP-output norm where the architecture has one, :mod:`kedit_rome.spread`),
   and the batched least-squares update ``Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1`` (Eq. 14,
   :meth:`MEMIT.layer_solver`), applied before the next layer is visited.

Steps 1-2 run in :class:`kedit_rome.spread_edit.SpreadMethod` (shared with PMET and AlphaEdit); MEMIT supplies
the solve of step 2.

All updates are taken off the model again before returning (the core applies the patch).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.method import EditContext

from .distribute import LayerSolve
from .ops.least_squares import batched_least_squares
from .spread_edit import SpreadHyperparams, SpreadMethod


class MEMITHyperparams(SpreadHyperparams):
    """MEMIT's knobs (see :class:`kedit_rome.spread_edit.SpreadHyperparams`)."""

    #: lambda in ``lambda C + K K^T`` (C is the per-token mean second moment)
    mom2_update_weight: float = Field(default=15000.0, gt=0)


class MEMIT(SpreadMethod):
    """Batched edits spread over several MLP layers."""

    name = "memit"
    hparams_class = MEMITHyperparams

    def layer_solver(
        self,
        model: Any,
        tokenizer: Any,
        arch: ArchitectureSpec,
        layers: list[int],
        hparams: MEMITHyperparams,
        ctx: EditContext,
    ) -> LayerSolve:
        """MEMIT Eq. 14 with each layer's second moment ``C``."""
        stats = self.statistics.second_moment(model, tokenizer, arch, layers, hparams, ctx)

        def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return batched_least_squares(stats[layer], keys, residuals, hparams.mom2_update_weight)

        return solve
