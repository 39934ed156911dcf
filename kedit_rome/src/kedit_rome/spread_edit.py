"""The MEMIT-style edit shared by MEMIT, PMET and AlphaEdit: free vectors at the last critical layer, a
target hidden state ``z`` per request, spread over the critical layers' FFN weights.

1. optimize free vectors added to ``sites`` of the last critical layer ``L`` (:mod:`kedit_rome.value`);
2. the FFN's part of the new hidden state: ``r = N(m + delta_m) - N(m)`` with ``delta_m`` the
   vector at the FFN output (``N`` = the post-MLP norm where the architecture has one, else
   identity; :func:`kedit_rome.spread.mlp_output_effect`), so ``z = h_L + r``;
3. ``z`` is written into the FFN weights of the critical layers (:func:`kedit_rome.distribute.distribute`),
   each layer's update solved from its keys and residuals by the method's :meth:`SpreadMethod.layer_solver`.

MEMIT optimizes the FFN output alone and solves MEMIT's least squares (Eq. 14); PMET optimizes the
attention output jointly and discards it; AlphaEdit solves the null-space projected least squares.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.request import EditRequest

from .common import Statistics, StatsOptions
from .distribute import LayerSolve, distribute, hidden_at_subject
from .spread import mlp_output_effect
from .value import ValueOptions, optimize_values_chunked


class SpreadHyperparams(Hyperparams, ValueOptions, StatsOptions):
    #: the critical layers whose MLP down-projections share the update (last one: where z is set)
    layers: list[int] = Field(default=[3, 4, 5, 6], min_length=1)
    batch_size: int = Field(default=1000, ge=1)
    #: requests whose free vectors are optimized together (they are independent; larger groups
    #: fill the passes better; memory grows by ~1 MB per request for the essence reference
    #: distribution)
    value_batch_size: int = Field(default=100, ge=1)


class SpreadMethod(EditMethod):
    """Batched edits spread over several MLP layers (steps 1-3 above). Subclasses say how a layer's
    update is solved (:meth:`layer_solver`), and may optimize a vector at the attention output too
    (:meth:`attn_clamp`) or record state with the patch (:meth:`edit_state`)."""

    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_rome"

    def __init__(self) -> None:
        self.statistics = Statistics()

    @abstractmethod
    def layer_solver(
        self, model: Any, tokenizer: Any, arch: ArchitectureSpec, layers: list[int], hparams: Any, ctx: EditContext
    ) -> LayerSolve:
        """The update rule of the critical ``layers`` (called once per edit, before the values are optimized)."""

    def attn_clamp(self, hparams: Any) -> float | None:
        """Norm clamp of a vector at the attention output (PMET), or None to optimize the FFN output alone."""
        return None

    def edit_state(self, arch: ArchitectureSpec, keys: dict[int, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """State tensors the patch records, given each critical layer's keys ``[n, d_in]``; none by default."""
        return {}

    def compute_edit(
        self,
        model: Any,
        tokenizer: Any,
        requests: list[EditRequest],
        hparams: SpreadHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        layers = sorted(arch.check_layers(model, hparams.layers, "layers"))
        top = layers[-1]
        templates = self.statistics.templates(model, tokenizer, hparams, ctx)
        solve = self.layer_solver(model, tokenizer, arch, layers, hparams, ctx)
        attn_clamp = self.attn_clamp(hparams)
        sites, clamps = [arch.layer_path(top, arch.mlp_out)], [hparams.clamp_norm_factor]
        if attn_clamp is not None:
            sites, clamps = [arch.layer_path(top, arch.attn_out), *sites], [attn_clamp, *clamps]
        result = optimize_values_chunked(
            model, tokenizer, arch, requests, templates, sites, top, hparams, hparams.value_batch_size, clamps
        )
        norm = arch.module(model, top, arch.post_mlp_norm) if arch.post_mlp_norm else None
        ffn_change = mlp_output_effect(norm, result.initial[-1], result.deltas[-1])
        z = hidden_at_subject(model, tokenizer, arch, requests, top) + ffn_change
        updates = distribute(
            model, tokenizer, arch, requests, templates, layers, z, target_site=arch.layer_path(top), solve=solve
        )
        extra = {
            "z_steps": result.steps,
            "target_nll": result.nll,
            "sites": sites,
            "site_output_norms": [float(x.norm(dim=1).mean()) for x in result.initial],
            "site_delta_norms": [float(d.norm(dim=1).mean()) for d in result.deltas],
        }
        state = self.edit_state(arch, updates.keys)
        return Edit(dense=updates.dense, lowrank=updates.lowrank, state=state, extra=extra)
