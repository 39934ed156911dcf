"""Evaluation on the paper's dimensions: reliability, generalization, locality, portability,
fluency (and the CounterFact probability scores); efficiency is measured by the Editor."""

from .evaluator import Evaluator, PairScore, Reference
from .metrics import PROTOCOLS, Metric, all_metrics, metric_names, ngram_entropy, token_accuracy

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
