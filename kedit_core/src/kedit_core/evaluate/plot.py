"""Plots of sequential editing runs: metrics against the number of edits.

For each method, the curve at ``n`` is the mean of the scores taken right after each of the first
``n`` edits (``EditResult.post``); the marker at the end is the score of all edits on the final
model (``EditResult.post_final``) -- the two protocols can differ a lot (ARCHITECTURE.md §5); a dashed
grey line is the unedited model's score (``EditResult.pre``). Panels are drawn for the metrics some run
has (teacher-forced and generation-scored; efficacy and paraphrase scores on CounterFact data).
matplotlib is imported only when a plot is drawn (Agg backend, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_METRICS = (
    "reliability",
    "generalization",
    "locality",
    "gen_reliability",
    "gen_generalization",
    "gen_locality",
    "efficacy_score",
    "paraphrase_score",
)


def _rows(result: Any) -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """(after-each rows, final rows) of an ``EditResult`` or of its ``to_report()`` dict."""
    if isinstance(result, dict):
        per = result.get("per_request", [])
        final = [r["final"] for r in per if "final" in r]
        return [r.get("post", {}) for r in per], (final if len(final) == len(per) and per else None)
    return list(result.post), (list(result.post_final) if result.post_final is not None else None)


def _has(result: Any, name: str) -> bool:
    post, _ = _rows(result)
    return any(row.get(name) is not None for row in post)


def unedited_scores(result: Any, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Per metric, the unedited model's mean score over the run's requests (empty when not scored)."""
    pre = result.get("per_request", []) if isinstance(result, dict) else []
    rows = [r.get("pre", {}) for r in pre] if isinstance(result, dict) else list(result.pre)
    out = {}
    for name in metrics:
        values = [float(r[name]) for r in rows if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def running_curves(result: Any, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, list[float | None]]:
    """Per metric, the running mean of the after-each-edit scores (``None`` until a score exists)."""
    post, _ = _rows(result)
    curves: dict[str, list[float | None]] = {}
    for name in metrics:
        total, count, curve = 0.0, 0, []
        for row in post:
            if row.get(name) is not None:
                total += float(row[name])
                count += 1
            curve.append(total / count if count else None)
        curves[name] = curve
    return curves


def final_scores(result: Any, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Per metric, the mean score of all edits on the final model (empty when not scored)."""
    _, final = _rows(result)
    out = {}
    for name in metrics:
        values = [float(r[name]) for r in final or [] if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def plot_sequential(
    results: Sequence[tuple[str, Any]],
    path: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    title: str | None = None,
) -> Path:
    """Write a PNG with one panel per metric and one line per ``(label, EditResult or report)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(_has(result, m) for _, result in results)] or list(metrics[:1])
    cols = min(4, len(metrics)) or 1
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, metrics, strict=False):
        baseline = [unedited_scores(r, [name]).get(name) for _, r in results]
        baseline = [b for b in baseline if b is not None]
        if baseline:
            ax.axhline(baseline[0], color="grey", linestyle="--", linewidth=1, label=f"unedited: {baseline[0]:.3f}")
        for k, (label, result) in enumerate(results):
            curve = running_curves(result, [name])[name]
            xs = [i + 1 for i, v in enumerate(curve) if v is not None]
            ys = [v for v in curve if v is not None]
            if not xs:
                continue
            color = f"C{k}"
            ax.plot(xs, ys, color=color, label=f"{label} (after each edit)")
            final = final_scores(result, [name]).get(name)
            if final is not None:
                ax.scatter(
                    [len(curve)],
                    [final],
                    color=color,
                    marker="*",
                    s=120,
                    zorder=3,
                    label=f"{label} (final model): {final:.3f}",
                )
        ax.set_title(name)
        ax.set_xlabel("number of edits")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
