"""Training SERAC's scope classifier with :class:`~kedit_core.trainer.BaseTrainer`.

For a batch of training edits z_1..z_B with in-scope inputs P_i (the edit prompt and its rephrases,
bare and followed by the new target) and out-of-scope inputs N_i (locality probes and neighbourhood
prompts, bare and answered), the losses are binary cross-entropies of g_φ:

    L_edit = mean_{i, x ∈ P_i} -log g_φ(z_i, x)
    L_loc  = ½ mean_{i, x ∈ N ∪ P_{j≠i}} -log(1 - g_φ(z_i, x)) + ½ mean_x max_i -log(1 - g_φ(z_i, x))

(the second half of L_loc weighs the hardest negative of every input, which is what decides
routing when many edits are stored together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kedit_core.request import EditRequest
from kedit_core.trainer import BaseTrainer

from .counterfactual import pick_demonstrations
from .encoder import ENCODER_ID, SentenceEncoder, embed_cached
from .scope_classifier import ScopeClassifier


def edit_text(r: EditRequest) -> str:
    """The edit descriptor z_e as the classifier reads it."""
    return f"{r.prompt.rstrip()} {r.target_new.strip()}"


def in_scope_inputs(r: EditRequest) -> list[str]:
    prompts = [r.prompt, *r.rephrase_prompts]
    return [p.rstrip() for p in prompts] + [f"{p.rstrip()} {r.target_new.strip()}" for p in prompts]


def out_of_scope_inputs(r: EditRequest) -> list[str]:
    out = []
    for probe in r.locality:
        out += [probe.prompt.rstrip(), f"{probe.prompt.rstrip()} {probe.target.strip()}"]
    out += [p.rstrip() for p in r.neighborhood_prompts]
    return out


class ScopeTrainer(BaseTrainer):
    def __init__(
        self,
        hparams: Any,
        out_dir: Path,
        train: list[EditRequest],
        val: list[EditRequest] | None,
        encoder: SentenceEncoder,
        cache_dir: Path | None,
        progress: bool = True,
    ) -> None:
        super().__init__(hparams, out_dir, train, val, progress=progress)
        records = self.train_data + self.val_data
        texts: dict[str, int] = {}
        self.index: dict[int, tuple[int, list[int], list[int]]] = {}
        for r in records:
            ids = []
            for group in ([edit_text(r)], in_scope_inputs(r), out_of_scope_inputs(r)):
                ids.append([texts.setdefault(t, len(texts)) for t in group])
            self.index[id(r)] = (ids[0][0], ids[1], ids[2])
        self.embeddings = embed_cached(encoder, list(texts), cache_dir)
        self.classifier = ScopeClassifier(encoder.dim)
        self.demonstrations = pick_demonstrations(self.train_data, hparams.n_demonstrations)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"proj": self.classifier.proj, "scale": self.classifier.scale, "bias": self.classifier.bias}

    def config(self) -> dict[str, Any]:
        return {"encoder": ENCODER_ID, "dim": int(self.embeddings.shape[1]), "demonstrations": self.demonstrations}

    def losses(self, batch: list[EditRequest]) -> dict[str, torch.Tensor]:
        edits, queries, owner, positive = [], [], [], []
        for i, r in enumerate(batch):
            e, pos, neg = self.index[id(r)]
            edits.append(e)
            queries += pos + neg
            owner += [i] * (len(pos) + len(neg))
            positive += [True] * len(pos) + [False] * len(neg)
        logits = self.classifier.logits(self.embeddings[edits], self.embeddings[queries])  # [Q, B]
        owner_t, positive_t = torch.tensor(owner), torch.tensor(positive)
        pos_mask = torch.zeros_like(logits, dtype=torch.bool)
        pos_mask[torch.arange(len(queries)), owner_t] = positive_t
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        edit_loss = bce(logits[pos_mask], torch.ones(int(pos_mask.sum())))
        neg_logits = logits.masked_fill(pos_mask, float("-inf"))
        all_neg = bce(logits[~pos_mask], torch.zeros(int((~pos_mask).sum())))
        hardest = neg_logits.max(dim=1).values
        hard_neg = bce(hardest, torch.zeros_like(hardest))
        with torch.no_grad():
            pos_acc = (logits[pos_mask] > 0).float().mean()
            neg_acc = (hardest < 0).float().mean()
        return {
            "edit": edit_loss,
            "locality": 0.5 * (all_neg + hard_neg),
            "in_scope_acc": pos_acc,
            "out_of_scope_acc": neg_acc,
        }
