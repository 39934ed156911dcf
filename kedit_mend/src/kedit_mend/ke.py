"""KE: KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in Language Models").

A hyper-network conditioned on the edit's text (a BiLSTM over the token embeddings of prompt and
new target) rescales the fine-tuning gradient into a gated update
``Δ = -s σ(η) (α̂ ⊙ ∇_W L + β̂)`` (:mod:`.hypernetwork`); it is trained with the edit loss and a
KL constraint on unrelated inputs (:mod:`.train_editor`). Edits of a batch add their updates.
"""

from __future__ import annotations

from pydantic import Field

from .editor_method import EditorHyperparams, TrainedEditorMethod
from .hypernetwork import KENetwork


class KEHyperparams(EditorHyperparams):
    lstm_hidden: int = Field(default=128, ge=1)
    cond_dim: int = Field(default=128, ge=1)
    head_hidden: int = Field(default=128, ge=1)


class KE(TrainedEditorMethod):
    name = "ke"
    hparams_class = KEHyperparams
    edit_area = "FFN (hyper-network)"
    network_kind = "ke"

    def build_network(self, model, arch, hparams: KEHyperparams) -> KENetwork:
        params, shapes = self.edited_params(model, arch, hparams)
        dim = model.get_input_embeddings().weight.shape[1]
        return KENetwork(
            params,
            shapes,
            dim,
            hparams.lstm_hidden,
            hparams.cond_dim,
            hparams.head_hidden,
            hparams.edit_lr,
            hparams.seed,
        )

    def network_from_config(self, config) -> KENetwork:
        return KENetwork.from_config(config)

    def config_mismatch(self, ckpt, model) -> str | None:
        dim, found = model.get_input_embeddings().weight.shape[1], ckpt.config.get("embed_dim")
        if found != dim:
            return f"conditioned on token embeddings of size {found!r}, this model's are of size {dim}"
        return None
