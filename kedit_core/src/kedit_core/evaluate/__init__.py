"""Evaluation on the paper's dimensions: reliability, generalization, locality, portability,
fluency (and the CounterFact probability scores); efficiency is measured by the Editor. Whether an edited
model still models text at all -- perplexity on a held-out text, unchanged answers to unrelated prompts --
is :mod:`.drift`.

The evaluator (torch) loads on first use, so that the metric registry (``.metrics``) is importable by
the command line without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metrics import PROTOCOLS, Metric, all_metrics, metric_names, ngram_entropy, token_accuracy

_EVALUATOR = ("Evaluator", "PairScore", "Reference")

__all__ = [
    "Evaluator",
    "Metric",
    "PairScore",
    "Reference",
    "PROTOCOLS",
    "all_metrics",
    "metric_names",
    "ngram_entropy",
    "token_accuracy",
]


def __getattr__(name: str) -> Any:
    if name in _EVALUATOR:
        return getattr(importlib.import_module(f"{__name__}.evaluator"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
