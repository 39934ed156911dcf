"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022a, "Fast Model
Editing at Scale").

A small gradient network, trained once per model (:mod:`.train_editor`), maps the rank-one factors
``(u_t, δ_t)`` of the edit's fine-tuning gradient to ``(ũ_t, δ̃_t)``; the edit is
``Δ_ℓ = -η_ℓ Σ_t δ̃_t ũ_tᵀ`` (:mod:`.gradient_network`), stored as a low-rank patch. A batch of
edits sums its gradient terms into one update.
"""

from __future__ import annotations

from pydantic import Field

from .editor_method import EditorHyperparams, TrainedEditorMethod
from .gradient_network import MENDNetwork


class MENDHyperparams(EditorHyperparams):
    #: rank of the gradient network's low-rank layers (the checkpoint's size grows with it)
    rank: int = Field(default=64, ge=1)
    #: low-rank residual layers of the gradient network
    n_layers: int = Field(default=2, ge=1)
    #: training: edits whose gradients are summed into one update (trains batch editing)
    train_group_size: int = Field(default=1, ge=1)


class MEND(TrainedEditorMethod):
    name = "mend"
    hparams_class = MENDHyperparams
    edit_area = "FFN (gradient network)"
    network_kind = "mend"

    def build_network(self, model, arch, hparams: MENDHyperparams) -> MENDNetwork:
        params, shapes = self.edited_params(model, arch, hparams)
        return MENDNetwork(params, shapes, hparams.rank, hparams.n_layers, hparams.edit_lr, hparams.seed)

    def network_from_config(self, config) -> MENDNetwork:
        return MENDNetwork.from_config(config)

    def config_mismatch(self, ckpt, model) -> str | None:
        # every low-rank layer has tensors of its own: a larger count cannot describe the checkpoint (and
        # building that many layers, even without memory, could take forever)
        n = ckpt.config.get("n_layers")
        if not isinstance(n, int) or not 1 <= n <= len(ckpt.tensors):
            return f"config.json n_layers={n!r} does not fit the {len(ckpt.tensors)} tensors of the checkpoint"
        return None
