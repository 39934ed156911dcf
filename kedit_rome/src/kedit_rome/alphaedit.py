"""AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models (Fang et al., ICLR 2025).

MEMIT's edit (:mod:`kedit_rome.spread_edit`: a target hidden state ``z`` per request, spread over the
critical layers, through Gemma's MLP-output norm where there is one) with one change, the update of
each layer (:func:`kedit_rome.ops.least_squares.null_space_least_squares`)::

    Delta = R K_1^T P (K_p K_p^T P + K_1 K_1^T P + lambda I)^-1

- ``P`` projects onto the null space of the preserved knowledge's keys ``K_0``: the eigenvectors of the
  key second moment ``C`` (MEMIT's statistics) whose eigenvalues are below ``nullspace_threshold``
  (:mod:`kedit_rome.ops.null_space`). ``Delta = Delta P``, so keys of text in general keep their
  values, where MEMIT's ``lambda C`` only discourages changing them;
- ``K_p``: the keys of the edits already in the model, so that a sequential stream's later batches
  leave the earlier batches' outputs in place (as far as the null space allows);
- ``lambda`` (``l2_weight``): the weight of ``||Delta P||^2``; it keeps the solve well posed.

The stream's state: each patch records the keys it wrote, per layer, as the state tensor
``state/<down-projection module>/edit_keys`` (``[n, d_in]`` float32: 80 kB for 10 edits of Gemma 3
270M), and ``K_p K_p^T`` is the sum of ``K K^T`` over the patches applied to the model
(:func:`kedit_core.patch.stack`). It is what the model holds, however the earlier patches got there: a
sequential run (the Editor applies each patch before computing the next), a resumed run (the Editor
applies the saved patches before the next edit), patches applied by hand; independent edits are reverted
before the next one, and add nothing. :class:`EditedKeys` keeps the sum per method instance, keyed by
the applied patches' ids, and extends it as the stack grows: the same additions in the same order as a
sum from scratch, so a resumed run computes bit for bit the patches an uninterrupted one does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.errors import HparamsError
from kedit_core.method import EditContext, PatchKind
from kedit_core.patch import stack

from .distribute import LayerSolve
from .ops.least_squares import null_space_least_squares
from .ops.null_space import NullSpaceRule
from .spread_edit import SpreadHyperparams, SpreadMethod

log = logging.getLogger(__name__)

#: name of the state tensor holding the keys a patch wrote into a down-projection
EDIT_KEYS = "edit_keys"


class AlphaEditHyperparams(SpreadHyperparams):
    """AlphaEdit's knobs (see :class:`kedit_rome.spread_edit.SpreadHyperparams`)."""

    #: eigenvalues of the key second moment ``C`` below this count as zero; their eigenvectors span
    #: the null space ``P`` projects onto (the paper: 1e-2; its released configs: 2e-2)
    nullspace_threshold: float = Field(default=1e-2, gt=0)
    #: compare the eigenvalues with ``nullspace_threshold`` times their mean ``trace(C) / d`` (the
    #: scale of the keys differs between models) instead of the bare value
    nullspace_threshold_relative: bool = False
    #: lambda, the weight of ``||Delta P||^2``; small against ``||P k||^2`` of the edit keys, or the edit is
    #: damped. The paper's code uses 10 (``L2``) with one key per context template (six), where kedit
    #: averages the keys over the templates: its 10 weighs like 10 / 6 here, hence the default 1.5.
    #: Gemma 3 270M's preset: 0.1 (measured there)
    l2_weight: float = Field(default=1.5, gt=0)


class EditedKeys:
    """``K_p K_p^T`` per down-projection: the sum of ``K K^T`` (float64, CPU) over the keys recorded by
    the weight-delta patches applied to a model, oldest first; remembered with the patch ids it covers."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}

    def second_moment(self, model: nn.Module, module: str) -> torch.Tensor | None:
        """``K_p K_p^T`` of ``module`` (a down-projection's path), or None when no applied patch wrote keys there."""
        written = []
        for handle in stack(model):
            if handle.patch.kind is PatchKind.WEIGHT_DELTA:
                keys = handle.patch.state_groups().get(module, {}).get(EDIT_KEYS)
                if keys is not None:
                    written.append((handle.patch.patch_id, keys))
        if not written:
            return None
        ids = tuple(patch_id for patch_id, _ in written)
        done, total = self._memo.get(module, ((), None))
        if total is None or ids[: len(done)] != done:
            done, total = (), None
        for _, keys in written[len(done) :]:
            k = keys.double()
            total = k.T @ k if total is None else total + k.T @ k
        self._memo[module] = (ids, total)
        return total


class AlphaEdit(SpreadMethod):
    """MEMIT's batched edits, each update projected onto the null space of the preserved knowledge."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperparams

    def __init__(self) -> None:
        super().__init__()
        self.edited_keys = EditedKeys()

    def layer_solver(
        self,
        model: Any,
        tokenizer: Any,
        arch: ArchitectureSpec,
        layers: list[int],
        hparams: AlphaEditHyperparams,
        ctx: EditContext,
    ) -> LayerSolve:
        rule = NullSpaceRule(hparams.nullspace_threshold, hparams.nullspace_threshold_relative)
        projectors = self.statistics.null_spaces_of(model, tokenizer, arch, layers, hparams, ctx, rule)
        for layer, p in projectors.items():
            rank = round(float(p.diagonal().sum()))
            if rank == 0:
                raise HparamsError(
                    f"hyperparameter 'nullspace_threshold': {rule.threshold:g}"
                    f"{' x the mean eigenvalue' if rule.relative else ''} leaves no null space at layer {layer} "
                    "(no eigenvalue of the key second moment is below it): the update would be zero"
                )
            log.info("layer %d: null space of %d of %d key dimensions", layer, rank, p.shape[0])
        priors = {
            layer: self.edited_keys.second_moment(model, arch.layer_path(layer, arch.mlp_out)) for layer in layers
        }

        def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            prior = priors[layer]
            return null_space_least_squares(
                projectors[layer].to(keys.device),
                keys,
                residuals,
                None if prior is None else prior.to(keys.device),
                hparams.l2_weight,
            )

        return solve

    def edit_state(self, arch: ArchitectureSpec, keys: dict[int, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The keys this edit wrote, per down-projection: the ``K_p`` of the edits after it."""
        return {arch.layer_path(layer, arch.mlp_out): {EDIT_KEYS: k.float()} for layer, k in keys.items()}
