"""Writing a trace: JSON of the effect matrix and a heat map like Fig. 1 of the ROME paper."""

from __future__ import annotations

import json
from pathlib import Path

from kedit_core.fsutil import atomic_path

from .causal_trace import TraceResult

#: colour maps of the paper's Fig. 1: hidden states purple, MLP green, attention red
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"hidden": "single restored layer", "mlp": "restored MLP outputs", "attn": "restored attention outputs"}


def write_json(result: TraceResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
    return path


def plot_heatmap(result: TraceResult, path: str | Path) -> Path:
    """Heat map of the restored probability per (token, layer); subject tokens are starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s0, s1 = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s0 <= i < s1 else "") for i, t in enumerate(result.tokens)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(result.layers) + 2), 0.32 * len(labels) + 1.4), dpi=150)
    img = ax.pcolor(result.scores, cmap=CMAPS.get(result.kind, "Purples"), vmin=result.corrupted_prob)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    step = max(1, len(result.layers) // 9)
    ax.set_xticks([i + 0.5 for i in range(0, len(result.layers), step)])
    ax.set_xticklabels(result.layers[::step], fontsize=7)
    window = f", window {result.window}" if result.kind != "hidden" else ""
    ax.set_title(f"Impact of {TITLES.get(result.kind, result.kind)}{window}", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    cbar = fig.colorbar(img, ax=ax)
    cbar.ax.set_title(f"p({result.answer.strip()})", fontsize=7, y=-0.12)
    cbar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_trace(result: TraceResult, prefix: str | Path, png: bool = True) -> dict[str, Path]:
    """Write ``<prefix>_<kind>.json`` (and ``.png``); returns the paths written."""
    base = f"{prefix}_{result.kind}"
    out = {"json": write_json(result, base + ".json")}
    if png:
        out["png"] = plot_heatmap(result, base + ".png")
    return out
