"""Layer profiles: the indirect effect at the subject's last token, averaged over many facts.

This is how a user picks the layers to edit in a new model (ROME paper, Fig. 2): trace the MLP
outputs (a window of layers around each layer) at the last subject token for facts the model
knows, and edit where the average effect peaks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kedit_core.architecture import ArchitectureSpec, resolve_architecture
from kedit_core.ops.logits import next_token_logits
from kedit_core.ops.tokens import split_prompt_target

from .causal_trace import _answer_id, restored_probabilities, subject_token_range, window_layers
from .noise import embedding_std, subject_noise

log = logging.getLogger(__name__)

#: a fact counts in the normalized effect when noise drops its answer's probability by more than this
MIN_GAP = 0.01


@dataclass
class LayerProfile:
    kind: str
    window: int
    n_facts: int
    #: mean indirect effect per layer, and the same normalized by each fact's (clean - corrupted) gap (over
    #: the facts whose gap exceeds ``MIN_GAP``)
    mean_effect: list[float]
    mean_normalized_effect: list[float]
    per_fact: list[dict[str, Any]]

    def peak_layers(self, top: int = 3) -> list[int]:
        row = self.mean_effect
        return sorted(range(len(row)), key=lambda i: -row[i])[:top]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_layers": self.peak_layers()}


@torch.no_grad()
def known_facts(
    model: nn.Module,
    tokenizer: Any,
    facts: Iterable[tuple[str, str, str]],
    n: int,
    *,
    min_prob: float = 0.05,
    max_rank: int = 3,
) -> list[tuple[str, str, str]]:
    """The first ``n`` of ``facts`` (prompt, subject, true answer) that the model knows -- the answer's first
    token has probability >= ``min_prob`` and is among the ``max_rank`` most probable next tokens -- and whose
    answer is not part of the subject (restoring the subject would then copy the answer)."""
    chosen: list[tuple[str, str, str]] = []
    for prompt, subject, answer in facts:
        if len(chosen) >= n:
            break
        if answer.strip().lower() in subject.lower():
            continue
        prompt_ids, answer_ids = split_prompt_target(tokenizer, prompt.rstrip(), answer)
        probs = next_token_logits(model, prompt_ids).softmax(-1)
        p = float(probs[answer_ids[0]])
        if p >= min_prob and int((probs > p).sum()) < max_rank:
            chosen.append((prompt, subject, answer))
    return chosen


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
    progress: bool = False,
) -> LayerProfile:
    """Trace ``facts`` (prompt, subject, answer or None) at the subject's last token only."""
    arch = arch or resolve_architecture(model)
    sigma = embedding_std(model, arch)
    hidden = model.get_input_embeddings().weight.shape[1]
    n_layers = arch.num_layers(model)
    per_fact = []
    for prompt, subject, answer in tqdm(facts, desc=f"tracing ({kind})", unit="fact", disable=not progress):
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
    # normalized over the facts that the noise hurt: a gap near zero (or negative, the noise raising the
    # answer's probability) would blow one fact's ratio up past all the others
    gaps = torch.tensor([f["clean_prob"] - f["corrupted_prob"] for f in per_fact])
    hurt = gaps > MIN_GAP
    ratios = torch.tensor([f["effect"] for f in per_fact])[hurt] / gaps[hurt, None]
    norm = ratios.mean(0) if bool(hurt.any()) else torch.zeros(n_layers)
    return LayerProfile(kind, window if kind != "hidden" else 1, len(per_fact), mean.tolist(), norm.tolist(), per_fact)
