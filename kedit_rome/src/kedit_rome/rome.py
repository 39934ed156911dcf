"""ROME: Rank-One Model Editing (Meng et al. 2022), with R-ROME's consistent key (Gupta et al. 2024).

1. key ``k*``: the down-projection input at the subject's last token of layer ``l``, averaged over
   the context templates (ROME Eq. 3, :func:`kedit_rome.ops.keys.compute_keys`);
2. value: ``v* = W k* + delta`` where ``delta``, added to the MLP output at the subject's last
   token of every template, maximizes ``log P(o*)`` under the essence KL, weight decay and the norm
   clamp (ROME Eq. 4, :mod:`kedit_rome.value`);
3. update (ROME Eq. 2) with the same ``k*`` that defined ``v*``:
   ``W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)`` -- and ``v* - W k* = delta`` exactly,
   because the MLP output averaged over the templates is ``W k*``. Using one key for both steps is
   the R-ROME fix for edits that "disable" the model.

The edit is the two low-rank factors of ``W_out``'s update: a few kilobytes.
"""

from __future__ import annotations

from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.request import EditRequest

from .common import Statistics, StatsOptions, lowrank_or_dense
from .ops.keys import compute_keys
from .ops.least_squares import rank_one_update
from .value import ValueOptions, optimize_values


class ROMEHyperparams(Hyperparams, ValueOptions, StatsOptions):
    #: the one layer whose MLP down-projection is edited
    layers: list[int] = Field(default=[5], min_length=1, max_length=1)
    #: adds ``mom2_damping * mean(diag C) * I`` to C before solving (0: none)
    mom2_damping: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1, ge=1, le=1)


class ROME(EditMethod):
    """Rank-one edit of one MLP down-projection; one request per patch."""

    name = "rome"
    hparams_class = ROMEHyperparams
    supports_batch = False
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
        hparams: ROMEHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        (request,) = requests
        (layer,) = arch.check_layers(model, hparams.layers, "layers")
        templates = self.statistics.templates(model, tokenizer, hparams, ctx)
        c = self.statistics.factorization(model, tokenizer, arch, layer, hparams, ctx, hparams.mom2_damping)
        key = compute_keys(model, tokenizer, arch, layer, [request.prompt], [request.subject], templates)[0]
        site = arch.layer_path(layer, arch.mlp_out)
        result = optimize_values(model, tokenizer, arch, [request], templates, [site], layer, hparams)
        a, b = rank_one_update(c, key, result.deltas[0][0])
        dense, lowrank = lowrank_or_dense(arch, arch.mlp_out_param(layer), a, b)
        extra = {"v_steps": result.steps, "target_nll": result.nll[0], "delta_norm": float(result.deltas[0][0].norm())}
        return Edit(dense=dense, lowrank=lowrank, extra=extra)
