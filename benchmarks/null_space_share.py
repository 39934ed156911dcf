"""How much room AlphaEdit's null space leaves: the share of key energy in it, for edit keys and for text.

AlphaEdit (``kedit_rome.alphaedit``) writes an update ``Delta P``, with ``P`` the projector onto the
eigenvectors of the key second moment ``C`` (the statistics corpus) whose eigenvalues are below the
threshold. A key ``k`` then moves its output by ``Delta P k``: only its share ``|P k|^2 / |k|^2`` in the
null space is reached. An edit asks ``Delta P k_e = r`` of its own keys, so ``Delta`` grows as their share
shrinks, and any other text is moved in proportion to *its* share. The projection protects text in
general only where edit keys hold a much larger share than that text does; where the two shares are
alike, AlphaEdit cannot keep text from moving any better than MEMIT's ``lambda C`` does.

For the method's preset (its critical layers, context templates and statistics corpus), per threshold
(times the mean eigenvalue where the preset's threshold is relative, as AlphaEdit reads it):
the null space's dimension, the statistics corpus's own share (its eigenvalues below the cutoff over the
trace), the mean share of the edit keys of the stream's first ``--n`` requests (``benchmarks/stream.py``:
training records, keys averaged over the templates as AlphaEdit computes them) and of every token of
the held-out text kedit-core ships (``kedit_core/data/heldout_text.txt``, 128-token windows), and the
ratio of the last two. Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/null_space_share.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
THRESHOLDS = (0.03, 0.01, 0.003, 0.001, 0.0003)


def _stream_module() -> Any:
    """``benchmarks/stream.py`` (the stream's requests, model loading), imported once."""
    name = "kedit_stream_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "stream.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


def text_keys(model: Any, tokenizer: Any, module: torch.nn.Module, text: str, window: int = 128) -> torch.Tensor:
    """``[T, d_in]``: the module's input at every token of ``text`` (the held-out perplexity's windows of
    ``window`` tokens, :func:`kedit_core.evaluate.drift.text_windows`; each window's BOS left out)."""
    from kedit_core.evaluate.drift import text_windows
    from kedit_core.ops.hooks import capture, stop_after

    device = next(model.parameters()).device
    skip = int(tokenizer.bos_token_id is not None)
    with torch.no_grad(), capture(module) as seen:
        for row in text_windows(tokenizer, text, window):
            with stop_after(module):
                model(input_ids=torch.tensor([row], device=device))
    return torch.cat([k[0, skip:] for k in seen]).double().cpu()


def share(keys: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean over the rows of ``|U^T k|^2 / |k|^2`` (``basis`` U: orthonormal columns)."""
    if basis.shape[1] == 0:
        return 0.0
    return float(((keys @ basis).pow(2).sum(1) / keys.pow(2).sum(1).clamp_min(1e-30)).mean())


def measure(
    setup: tuple[Any, Any, Any], method: str, n: int, thresholds: tuple[float, ...], hparams: dict | None = None
) -> dict[str, Any]:
    from kedit_core.architecture import resolve_architecture
    from kedit_core.editor import Editor
    from kedit_core.evaluate.drift import heldout_text
    from kedit_core.method import EditContext
    from kedit_core.models import cache_dir, model_fingerprint
    from kedit_rome.common import Statistics
    from kedit_rome.ops.keys import compute_keys
    from kedit_rome.ops.null_space import NullSpaceRule, eigendecomposition

    model, tokenizer, info = setup
    hparams = Editor(method, model, tokenizer, hparams=hparams, model_info=info).hparams
    arch = resolve_architecture(model)
    ctx = EditContext(
        model_id=info.id, model_fingerprint=info.fingerprint or model_fingerprint(model), cache_dir=cache_dir()
    )
    stats = Statistics()
    requests, _ = _stream_module().stream_requests(n, 0)
    templates = stats.templates(model, tokenizer, hparams, ctx)
    layers = []
    for layer in hparams.layers:
        c = stats.second_moment(model, tokenizer, arch, [layer], hparams, ctx)[layer].cpu()
        values, vectors = eigendecomposition(c)
        edit = (
            compute_keys(
                model, tokenizer, arch, layer, [r.prompt for r in requests], [r.subject for r in requests], templates
            )
            .double()
            .cpu()
        )
        text = text_keys(model, tokenizer, arch.module(model, layer, arch.mlp_out), heldout_text())
        rows = []
        relative = getattr(hparams, "nullspace_threshold_relative", False)
        for t in thresholds:
            below = values < NullSpaceRule(t, relative).cutoff(values)
            basis = vectors[:, below].double()
            e, h = share(edit, basis), share(text, basis)
            corpus = float(values[below].clamp_min(0).sum() / values.clamp_min(0).sum())
            rows.append(
                {
                    "threshold": t,
                    "dims": int(below.sum()),
                    "corpus": corpus,
                    "edit_keys": e,
                    "heldout_text": h,
                    "ratio": e / h if h > 0 else None,
                }
            )
        layers.append(
            {
                "layer": layer,
                "d_in": int(c.shape[0]),
                "edit_keys": len(requests),
                "text_tokens": len(text),
                "rows": rows,
            }
        )
    return {"model": info.id, "method": method, "templates": len(templates), "layers": layers}


def table(report: dict[str, Any]) -> str:
    lines = []
    for entry in report["layers"]:
        lines.append(
            f"{report['method']} on {report['model']}, layer {entry['layer']} ({entry['d_in']} key dimensions; "
            f"{entry['edit_keys']} edit keys, {entry['text_tokens']} held-out text tokens)"
        )
        lines.append("| threshold | null dims | corpus share | edit keys share | held-out text share | edit / text |")
        lines.append("|---|---|---|---|---|---|")
        for r in entry["rows"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(
                f"| {r['threshold']:g} | {r['dims']} | {r['corpus']:.4f} | {r['edit_keys']:.4f} | "
                f"{r['heldout_text']:.4f} | {ratio} |"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="a model name/path, or 'tiny' (random LLaMA)")
    ap.add_argument("--method", default="alphaedit", help="whose preset (layers, templates, corpus) is measured")
    ap.add_argument("--n", type=int, default=100, help="edit keys: the stream's first N requests")
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="comma-separated cutoffs")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/null_space_share-<model>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    stream = _stream_module()
    setup = stream.load(args)
    tiny = stream.tiny_hparams().get(args.method) if args.model == "tiny" else None
    report = measure(setup, args.method, args.n, tuple(float(t) for t in args.thresholds.split(",")), tiny)
    print(table(report))
    out = Path(args.out) if args.out else HERE / "results" / f"null_space_share-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
