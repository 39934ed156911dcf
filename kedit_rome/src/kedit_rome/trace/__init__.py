"""Causal tracing (ROME paper, Fig. 1): where in the network a model recalls a fact.

The names below load on first use, so that the ``kedit trace`` command (``.cli``) is registered
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KINDS": "causal_trace", "TraceResult": "causal_trace", "causal_trace": "causal_trace",
    "restored_probabilities": "causal_trace", "subject_token_range": "causal_trace", "window_layers": "causal_trace",
    "embedding_std": "noise", "subject_noise": "noise",
    "plot_heatmap": "plot", "save_trace": "plot", "write_json": "plot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
