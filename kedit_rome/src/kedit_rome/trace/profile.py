"""Layer profiles: the indirect effect at the subject's last token, averaged over many facts.

This is how a user picks the layers to edit in a new model (ROME paper, Fig. 2): trace the MLP
outputs (a window of layers around each layer) at the last subject token for facts the model
knows, and edit where the average effect peaks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, resolve_architecture

from .causal_trace import _answer_id, restored_probabilities, subject_token_range, window_layers
from .noise import embedding_std, subject_noise

log = logging.getLogger(__name__)


@dataclass
class LayerProfile:
    kind: str
    window: int
    n_facts: int
    #: mean indirect effect per layer, and the same normalized by each fact's (clean - corrupted) gap
    mean_effect: list[float]
    mean_normalized_effect: list[float]
    per_fact: list[dict[str, Any]]

    def peak_layers(self, top: int = 3) -> list[int]:
        row = self.mean_effect
        return sorted(range(len(row)), key=lambda i: -row[i])[:top]


def subject_last_profile(
    model: nn.Module,
    tokenizer: Any,
    facts: list[tuple[str, str, str | None]],
    *,
    kind: str = "mlp",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    arch: ArchitectureSpec | None = None,
) -> LayerProfile:
    """Trace ``facts`` (prompt, subject, answer or None) at the subject's last token only."""
    arch = arch or resolve_architecture(model)
    sigma = embedding_std(model, arch)
    hidden = model.get_input_embeddings().weight.shape[1]
    n_layers = arch.num_layers(model)
    per_fact = []
    for prompt, subject, answer in facts:
        prompt = prompt.rstrip()
        ids = list(tokenizer(prompt)["input_ids"])
        s0, s1 = subject_token_range(tokenizer, prompt, subject)
        answer_id = _answer_id(model, tokenizer, prompt, ids, answer)
        eps = subject_noise(samples, s1 - s0, hidden, noise * sigma, seed)
        span = (
            (lambda layer: [layer])
            if kind == "hidden"
            else (lambda layer: list(window_layers(layer, window, n_layers)))
        )
        restorations = [()] + [tuple((s1 - 1, w) for w in span(layer)) for layer in range(n_layers)]
        clean, probs = restored_probabilities(model, arch, ids, (s0, s1), answer_id, eps, restorations, kind)
        effect = [p - probs[0] for p in probs[1:]]
        per_fact.append(
            {
                "prompt": prompt,
                "subject": subject,
                "answer": tokenizer.decode([answer_id]),
                "clean_prob": clean,
                "corrupted_prob": probs[0],
                "effect": effect,
            }
        )
        log.info(
            "%s: clean %.3f corrupted %.3f peak layer %d",
            prompt,
            clean,
            probs[0],
            max(range(n_layers), key=effect.__getitem__),
        )
    mean = torch.tensor([f["effect"] for f in per_fact]).mean(0)
    gaps = torch.tensor([max(f["clean_prob"] - f["corrupted_prob"], 1e-6) for f in per_fact])[:, None]
    norm = (torch.tensor([f["effect"] for f in per_fact]) / gaps).mean(0)
    return LayerProfile(kind, window if kind != "hidden" else 1, len(per_fact), mean.tolist(), norm.tolist(), per_fact)
