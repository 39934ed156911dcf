"""The metrics, as data in one place: name, protocol, the bench tables that show them -- and the pure
functions behind them. A plugin adds a metric (or a judge) through the ``register_metrics`` hook with a
:class:`Metric` that carries its own ``compute``; reports, tables and the CLI read :func:`all_metrics`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One metric. ``protocol`` says how it is measured (every report names it); ``tables`` the bench
    tables that show it (``zsre``: Table 2, ``counterfact``, ``sequential``). A plugin metric's
    ``compute(evaluator, requests, references)`` returns one value (or None) per request, on the model as
    it is; the built-ins have none, the evaluator computes them together in one batched pass."""

    name: str
    protocol: str
    tables: tuple[str, ...] = ()
    compute: Callable[[Any, list[Any], list[Any] | None], list[float | None]] | None = None


BUILTIN_METRICS: tuple[Metric, ...] = (
    Metric(
        "reliability",
        "easyedit-token-accuracy: teacher-forced argmax accuracy on the tokens of ' '+target_new after the edit prompt",
        ("zsre", "sequential"),
    ),
    Metric("generalization", "easyedit-token-accuracy: on the rephrased prompts", ("zsre", "sequential")),
    Metric(
        "locality",
        "easyedit-token-agreement: share of teacher-forced argmax tokens on locality probes unchanged by the edit",
        ("zsre", "sequential"),
    ),
    Metric("portability", "easyedit-token-accuracy: on the portability (one-hop) probes' answers", ("zsre",)),
    Metric(
        "efficacy_score",
        "counterfact-probability: P(target_new) > P(target_true) on the edit prompt (mean token NLL)",
        ("counterfact", "sequential"),
    ),
    Metric(
        "paraphrase_score",
        "counterfact-probability: P(target_new) > P(target_true) on paraphrase prompts",
        ("counterfact", "sequential"),
    ),
    Metric(
        "neighborhood_score",
        "counterfact-probability: P(target_true) > P(target_new) on neighborhood prompts",
        ("counterfact",),
    ),
    Metric(
        "gen_reliability",
        "generation-exact: greedy answer to the edit prompt (no target in context; up to EOS, a newline, a "
        "sentence end or the token budget), its leading phrase equal to target_new after normalization; 0 "
        "when the request is degenerate",
        ("zsre", "counterfact", "sequential"),
    ),
    Metric("gen_reliability_starts", "generation-starts: the greedy answer starts with target_new (word boundary)"),
    Metric("gen_reliability_contains", "generation-contains: the greedy answer contains target_new (whole words)"),
    Metric("gen_generalization", "generation-exact: on the rephrased prompts", ("zsre", "counterfact", "sequential")),
    Metric("gen_generalization_starts", "generation-starts: on the rephrased prompts"),
    Metric("gen_generalization_contains", "generation-contains: on the rephrased prompts"),
    Metric(
        "gen_locality",
        "generation-unchanged: share of locality probes (CounterFact: neighborhood prompts) whose greedy "
        "answer span is the unedited model's",
        ("zsre", "counterfact", "sequential"),
    ),
    Metric("gen_portability", "generation-exact: on the portability probes' answers", ("zsre",)),
    Metric(
        "degenerate",
        "generation-degeneracy: 1 when a continuation holds a special token, repeats a word n-gram 3 times in "
        "a row where the unedited model does not, or fluency drops > 1 bit below the unedited model's",
        ("zsre", "counterfact", "sequential"),
    ),
    Metric(
        "fluency",
        "ngram-entropy: weighted bi/tri-gram entropy (ROME/EasyEdit) of 40-token greedy generations from the edit "
        "prompt and the first generation prompt",
        ("zsre", "counterfact"),
    ),
)

#: which protocol produced each built-in metric (every report names them; see :func:`protocols`)
PROTOCOLS: dict[str, str] = {m.name: m.protocol for m in BUILTIN_METRICS}


def all_metrics() -> list[Metric]:
    """The built-in metrics, then those plugins registered, in display order."""
    from ..plugins import get_registry

    return [*BUILTIN_METRICS, *get_registry().metrics]


def metric_names(table: str | None = None) -> list[str]:
    """Every metric's name in display order, or those a bench table shows."""
    return [m.name for m in all_metrics() if table is None or table in m.tables]


def protocols() -> dict[str, str]:
    return {m.name: m.protocol for m in all_metrics()}


WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def token_accuracy(predicted: list[int], target: list[int]) -> float:
    """Share of positions where the argmax token equals the target token."""
    if not target:
        return 0.0
    return sum(int(p == t) for p, t in zip(predicted, target, strict=False)) / len(target)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of a text's word tokens."""
    words = WORD_RE.findall(text.lower())
    values = []
    for n, w in zip(ns, weights, strict=False):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
