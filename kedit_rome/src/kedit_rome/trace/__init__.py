"""Causal tracing (ROME paper, Fig. 1): where in the network a model recalls a fact."""

from .causal_trace import KINDS, TraceResult, causal_trace, restored_probabilities, subject_token_range, window_layers
from .noise import embedding_std, subject_noise
from .plot import plot_heatmap, save_trace, write_json

__all__ = [
    "KINDS",
    "TraceResult",
    "causal_trace",
    "embedding_std",
    "plot_heatmap",
    "restored_probabilities",
    "save_trace",
    "subject_noise",
    "subject_token_range",
    "window_layers",
    "write_json",
]
