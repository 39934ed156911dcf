"""Metric definitions (pure functions) and the protocol each metric follows."""

from __future__ import annotations

import math
import re
from collections import Counter

#: which protocol produced each metric -- part of every report
PROTOCOLS: dict[str, str] = {
    "reliability": "easyedit-token-accuracy: teacher-forced argmax accuracy on the tokens of ' '+target_new after the edit prompt",
    "generalization": "easyedit-token-accuracy on the rephrased prompts",
    "locality": "easyedit-token-agreement: share of teacher-forced argmax tokens on locality probes unchanged by the edit",
    "portability": "easyedit-token-accuracy on the portability (one-hop) probes' answers",
    "efficacy_score": "counterfact-probability: P(target_new) > P(target_true) on the edit prompt (mean token NLL)",
    "paraphrase_score": "counterfact-probability: P(target_new) > P(target_true) on paraphrase prompts",
    "neighborhood_score": "counterfact-probability: P(target_true) > P(target_new) on neighborhood prompts",
    "fluency": "weighted bi/tri-gram entropy of greedy generations (ROME/EasyEdit n-gram entropy)",
}

WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def token_accuracy(predicted: list[int], target: list[int]) -> float:
    """Share of positions where the argmax token equals the target token."""
    if not target:
        return 0.0
    return sum(int(p == t) for p, t in zip(predicted, target)) / len(target)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of a text's word tokens."""
    words = WORD_RE.findall(text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
