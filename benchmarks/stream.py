"""Lifelong editing at scale: a stream of N edits into ONE model, scored along the way, and whether the
model stays a model.

For each method (``--methods``; only methods that support sequential editing) the stream's requests are
edited in order into the same model -- in chunks of ``--batch`` where the method edits batches, else one
at a time (``Editor.edit(sequential=True)``). Every ``--every`` edits and at the end, a fixed-size sample
(``--sample``) of the edits made so far is scored on the model as it is at that moment: reliability,
generalization and locality, teacher-forced and (unless ``--no-generation``) in the generation protocol
(``kedit_core.evaluate.Evaluator``; locality against the unedited model's answers, recorded once before
the first method). Scoring does not change the model, and its time is not counted as editing time.

The stream: the project's shipped *training* records, never the evaluation files -- ZsRE train
(``zsre-train``, 1,000 records, the 2 with an empty target skipped) and CounterFact train
(``counterfact-train``, 9,887 records) interleaved one for one in file order (zsre 0, counterfact 0,
zsre 1, counterfact 1, ...; CounterFact alone once ZsRE runs out), from position ``--start``, ``--n``
requests. Every record has a rephrasing and one locality probe.

The sample at a checkpoint after ``d`` edits: the first ``--sample`` positions below ``d`` of one fixed
random permutation of the stream (``--seed``) -- a uniform sample of the edits so far, mostly shared by
successive checkpoints, so the unedited references are computed once for the union of all samples.

Does the model stay a model? Before each method and at its end (``--drift-every-checkpoint``: at every
checkpoint): perplexity on the held-out text kedit-core ships (``kedit_core/data/heldout_text.txt``,
written for the project; not the statistics corpus, which is built from the train records), and the
share of ``--probe-n`` unrelated prompts -- the neighborhood prompts of the CounterFact evaluation file,
de-duplicated, without any that names a subject of the stream -- whose greedy answer span is the unedited
model's (``kedit_core.evaluate.drift``).

Time per edit counts computing and applying the edits only (``EditResult.edit_seconds``), not the
checkpoints; peak RSS is the process's peak at the end of a method's run (earlier methods of the same
run included; run one method per process to compare them).

Prints a table, writes JSON (``--out``, default ``benchmarks/results/stream/<model>-<n>.json``) and a PNG
beside it: reliability / generalization / locality against the number of edits, one colour per method,
teacher-forced solid and generation-scored dashed, the unedited model's scores as grey lines.

``--merge A.json B.json ... --out C.json``: one report, table and figure from runs of the same stream
made in separate processes (one method each, as a 2-core machine runs them side by side); refused unless
the runs agree on the model, the stream, the checkpoint sample and the unedited model's measurements.

    python benchmarks/stream.py --model tiny --methods rome,grace --n 200 --every 50 --sample 20
    OMP_NUM_THREADS=1 python benchmarks/stream.py --model gemma3-270m --methods grace --n 40 --every 20 --sample 20
    python benchmarks/stream.py --model gemma3-270m --methods alphaedit,memit,grace,wise --n 2000 --batch 10
    python benchmarks/stream.py --merge grace.json melo.json --out gemma3-270m-2000.json

The 2,000-edit runs on Gemma 3 270M take hours of CPU per method (ROME-family edits are seconds each,
every checkpoint generates for each sampled edit); ``KEDIT_PROGRESS=1`` reports the slow steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("zsre-train", "counterfact-train")
PROBES = "counterfact"  # the shipped evaluation file: its neighborhood prompts are the unrelated probes
CURVES = ("reliability", "generalization", "locality")


def tiny_hparams() -> dict[str, dict]:
    """The small hyperparameters of benchmarks/long_run.py for the tiny random model."""
    spec = importlib.util.spec_from_file_location("long_run", Path(__file__).with_name("long_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY


def shipped_requests(name: str) -> tuple[list[Any], list[int]]:
    """The requests of a shipped data set, one record at a time: (valid requests, indices skipped)."""
    from kedit_core.trainer import read_training_requests

    out, skipped, _ = read_training_requests(name)
    return out, skipped


def stream_requests(n: int, start: int) -> tuple[list[Any], dict[str, Any]]:
    """Requests ``start .. start + n`` of the stream (the module docstring) and where they came from."""
    (zsre, zskip), (cf, cskip) = (shipped_requests(name) for name in SOURCES)
    order: list[tuple[str, int]] = []
    for i in range(max(len(zsre), len(cf))):
        order += [(src, i) for src, recs in zip(SOURCES, (zsre, cf), strict=True) if i < len(recs)]
    if start + n > len(order):
        raise SystemExit(f"the stream holds {len(order)} requests; --start {start} --n {n} asks for more")
    picked = order[start : start + n]
    by_name = dict(zip(SOURCES, (zsre, cf), strict=True))
    info = {
        "order": "zsre-train and counterfact-train interleaved one for one in file order",
        "sources": {src: sum(1 for s, _ in picked if s == src) for src in SOURCES},
        "skipped_records": {SOURCES[0]: zskip, SOURCES[1]: cskip},
        "start": start,
    }
    return [by_name[src][i] for src, i in picked], info


def checkpoint_counts(n: int, every: int, batch: int) -> list[int]:
    """Edit counts at which a run in chunks of ``batch`` is scored: the first chunk end at or past each
    multiple of ``every``, and the end."""
    ends = list(range(batch, n, batch)) + [n]
    marks, last = [], 0
    for done in ends:
        if done // every > last // every or done == n:
            marks.append(done)
        last = done
    return marks


def sample_of(perm: list[int], done: int, size: int) -> list[int]:
    """The first ``size`` positions below ``done`` in the fixed permutation, in stream order."""
    return sorted([i for i in perm if i < done][:size])


@dataclass
class Setup:
    """What every method's run shares: the model, the stream, the unedited model's scores."""

    args: argparse.Namespace
    model: Any
    tokenizer: Any
    info: Any
    requests: list[Any]
    perm: list[int]
    window: int
    pre: dict[int, dict[str, float]] = field(default_factory=dict)
    refs: dict[int, Any] = field(default_factory=dict)
    probe_prompts: list[str] = field(default_factory=list)
    probe_budgets: list[int] = field(default_factory=list)
    probe_answers: list[str] = field(default_factory=list)
    perplexity: float = math.nan

    def evaluator(self) -> Any:
        from kedit_core.evaluate import Evaluator

        return Evaluator(self.model, self.tokenizer, generation=not self.args.no_generation)


def load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from kedit_core.models import ModelInfo, load_model
    from kedit_core.testing import tiny_model

    if args.model == "tiny":
        model, tok = tiny_model("llama")
        return model, tok, ModelInfo(id="tiny-llama", key="", source="in-memory")
    return load_model(args.model)


def probe_set(setup: Setup, ev: Any) -> None:
    """The unrelated prompts (module docstring) and their answer budgets: the evaluator's for the
    prompt's true answer."""
    from kedit_core.request import load_requests

    subjects = {r.subject for r in setup.requests}
    seen: set[str] = set()
    for rec in load_requests(PROBES):
        for prompt in rec.neighborhood_prompts:
            if prompt in seen or any(s in prompt for s in subjects):
                continue
            seen.add(prompt)
            setup.probe_prompts.append(prompt)
            setup.probe_budgets.append(ev.answer_budget(rec.ground_truth or rec.target_new))
    setup.probe_prompts = setup.probe_prompts[: setup.args.probe_n]
    setup.probe_budgets = setup.probe_budgets[: setup.args.probe_n]


def measure_drift(setup: Setup) -> tuple[float, list[str]]:
    """Perplexity on the held-out text and the greedy answers to the probes, on the model as it is."""
    from kedit_core.evaluate.drift import greedy_answers, heldout_text, perplexity
    from kedit_core.progress import step

    with step("perplexity on the held-out text"):
        ppl = perplexity(setup.model, setup.tokenizer, heldout_text(), window=setup.window)
    with step(f"greedy answers to {len(setup.probe_prompts)} unrelated prompts"):
        answers = greedy_answers(setup.model, setup.tokenizer, setup.probe_prompts, setup.probe_budgets)
    return ppl, answers


def drift(setup: Setup) -> dict[str, float]:
    """:func:`measure_drift` against the unedited model's."""
    from kedit_core.evaluate.drift import unchanged_share

    ppl, answers = measure_drift(setup)
    return {"perplexity": ppl, "unchanged_share": unchanged_share(setup.probe_answers, answers)}


def means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the mean over the rows that have it."""
    from kedit_core.evaluate.metrics import mean

    names = sorted({k for row in rows for k, v in row.items() if v is not None})
    return {k: mean([r.get(k) for r in rows]) for k in names}


def prepare(setup: Setup, batches: dict[str, int]) -> None:
    """The unedited model's scores and locality references on every request some checkpoint samples,
    the probe prompts and the unedited model's answers and perplexity."""
    from kedit_core.progress import step

    args, ev = setup.args, setup.evaluator()
    wanted = sorted(
        {
            i
            for b in set(batches.values())
            for d in checkpoint_counts(args.n, args.every, b)
            for i in sample_of(setup.perm, d, args.sample)
        }
    )
    if wanted:
        with step(f"unedited model on the {len(wanted)} sampled requests"):
            pre, refs = ev.evaluate_with_reference([setup.requests[i] for i in wanted])
        setup.pre, setup.refs = dict(zip(wanted, pre, strict=True)), dict(zip(wanted, refs, strict=True))
    probe_set(setup, ev)
    setup.perplexity, setup.probe_answers = measure_drift(setup)


def score(setup: Setup, ev: Any, done: int) -> dict[str, Any]:
    """The checkpoint after ``done`` edits: the sample's metrics on the model as it is now."""
    from kedit_core.efficiency import current_rss_mb
    from kedit_core.progress import step

    idx = sample_of(setup.perm, done, setup.args.sample)
    t0 = time.perf_counter()
    rows = []
    if idx:
        with step(f"scoring {len(idx)} of {done} edits"):
            rows = ev.evaluate([setup.requests[i] for i in idx], [setup.refs[i] for i in idx])
    return {
        "edits": done,
        "sample": len(idx),
        "metrics": means(rows),
        "unedited": means([setup.pre[i] for i in idx]),
        "rss_mb": round(current_rss_mb(), 1),
        "score_s": round(time.perf_counter() - t0, 2),
    }


def make_editor(setup: Setup, name: str) -> Any:
    """An editor of ``name`` on the shared model: the tiny model's small hyperparameters (else the
    model's preset), with the ``--hparams`` overrides on top."""
    from kedit_core.editor import Editor

    args = setup.args
    over = (json.loads(args.hparams) if args.hparams else {}).get(name, {})
    tiny = {**tiny_hparams().get(name, {}), **over} if args.model == "tiny" else {}
    editor = Editor(name, setup.model, setup.tokenizer, hparams=tiny or None, model_info=setup.info, progress=True)
    if over and args.model != "tiny":
        editor.hparams = editor.hparams.updated(**over)
    return editor


def run_method(setup: Setup, name: str, batch: int) -> dict[str, Any]:
    """Edit the stream into the model with one method, scoring at the checkpoints; the model is put back
    as it was when the run ends."""
    from kedit_core.efficiency import current_rss_mb, peak_rss_mb

    args, editor = setup.args, make_editor(setup, name)
    marks, ev, points = set(checkpoint_counts(args.n, args.every, batch)), setup.evaluator(), []

    def checkpoint(done: int, edit_seconds: list[float]) -> None:
        if done not in marks:
            return
        point = score(setup, ev, done)
        point["edit_s"] = round(sum(edit_seconds), 3)
        if done == args.n or args.drift_every_checkpoint:
            point.update(drift(setup))
        points.append(point)
        print(f"[{name}] {point_line(point)}", flush=True)

    rss0, t0 = current_rss_mb(), time.perf_counter()
    edit_seconds: list[float] = []
    if args.n:
        result = editor.edit(
            setup.requests,
            sequential=True,
            keep_original_weight=True,
            evaluate=False,
            batch_size=batch,
            generation=not args.no_generation,
            on_chunk=lambda done, result: checkpoint(done, result.edit_seconds),
        )
        edit_seconds = result.edit_seconds
    else:
        checkpoint(0, edit_seconds)
    last = points[-1]
    return {
        "batch_size": batch,
        "hparams": editor.hparams.to_dict(),
        "edits": args.n,
        "time_per_edit_s": sum(edit_seconds) / max(1, args.n),
        "edit_s": round(sum(edit_seconds), 3),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rss_before_mb": round(rss0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "checkpoints": points,
        "final": last["metrics"],
        "perplexity_before": setup.perplexity,
        "perplexity_after": last["perplexity"],
        "perplexity_ratio": last["perplexity"] / setup.perplexity,
        "unchanged_share": last["unchanged_share"],
    }


def point_line(point: dict[str, Any]) -> str:
    m = point["metrics"]
    tf = " ".join(f"{k[:3]} {m[k]:.3f}" for k in CURVES if k in m)
    gen = " ".join(f"{k[:3]} {m['gen_' + k]:.3f}" for k in CURVES if "gen_" + k in m)
    extra = (
        f"  ppl {point['perplexity']:.2f}  unchanged {point['unchanged_share']:.3f}" if "perplexity" in point else ""
    )
    return (
        f"{point['edits']:>6} edits  TF {tf or '-'}  GEN {gen or '-'}  (sample {point['sample']}, "
        f"edit {point['edit_s']:.1f} s, scoring {point['score_s']:.1f} s, rss {point['rss_mb']:.0f} MB){extra}"
    )


def table(report: dict[str, Any]) -> str:
    head = "| method | edits | batch | s/edit | peak RSS MB | rel | gen | loc | GEN rel | GEN gen | GEN loc | ppl before -> after (ratio) | unchanged answers |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in report["methods"].items():
        f = r["final"]
        cells = [f"{f[k]:.3f}" if k in f else "-" for k in (*CURVES, *(f"gen_{k}" for k in CURVES))]
        lines.append(
            f"| {name} | {r['edits']} | {r['batch_size']} | {r['time_per_edit_s']:.3f} | {r['peak_rss_mb']:.0f} | "
            + " | ".join(cells)
            + f" | {r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f} ({r['perplexity_ratio']:.3f}) | "
            f"{r['unchanged_share']:.3f} |"
        )
    base = report["unedited"]["metrics"]
    cells = [f"{base[k]:.3f}" if k in base else "-" for k in (*CURVES, *(f"gen_{k}" for k in CURVES))]
    lines.append(
        "| unedited | 0 | - | - | - | " + " | ".join(cells) + f" | {report['unedited']['perplexity']:.2f} | 1.000 |"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Reliability / generalization / locality against the number of edits: a colour per method,
    teacher-forced solid, generation-scored dashed, the unedited model's scores in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.6 * len(CURVES), 3.8), squeeze=False)
    base = report["unedited"]["metrics"]
    for ax, name in zip(axes[0], CURVES, strict=True):
        for key, style in ((name, ":"), (f"gen_{name}", "-.")):
            if key in base:
                ax.axhline(
                    base[key], color="grey", linestyle=style, linewidth=1, label=f"unedited {key}: {base[key]:.3f}"
                )
        for k, (method, run) in enumerate(report["methods"].items()):
            for key, style, marker, proto in ((name, "-", "o", "TF"), (f"gen_{name}", "--", "x", "GEN")):
                xs = [p["edits"] for p in run["checkpoints"] if key in p["metrics"]]
                ys = [p["metrics"][key] for p in run["checkpoints"] if key in p["metrics"]]
                if xs:
                    ax.plot(xs, ys, color=f"C{k}", linestyle=style, marker=marker, label=f"{method} ({proto})")
        ax.set_title(name)
        ax.set_xlabel("number of edits")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{report['model']}: {report['n']} edits in a stream, sample of {report['sample']} per checkpoint")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# what runs of one stream share; a merged report needs them equal
SHARED = ("model", "n", "every", "sample", "seed", "generation", "stream", "heldout", "probes", "unedited")


def merge(paths: list[Path]) -> dict[str, Any]:
    """One report from runs of the same stream written by separate processes."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first, merged = reports[0], {k: v for k, v in reports[0].items() if k not in ("methods", "note")}
    merged["methods"], merged["merged_from"] = {}, [Path(p).name for p in paths]
    for path, report in zip(paths, reports, strict=True):
        differ = [k for k in SHARED if report.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{path}: not the same stream as {paths[0]} (differs in {', '.join(differ)})")
        for name, run in report["methods"].items():
            if name in merged["methods"]:
                raise SystemExit(f"{path}: method {name!r} is in two of the runs")
            merged["methods"][name] = run
    notes = [f"{Path(p).name}: {r['note']}" for p, r in zip(paths, reports, strict=True) if r.get("note")]
    if notes:
        merged["note"] = "; ".join(notes)
    return merged


def method_batches(args: argparse.Namespace) -> dict[str, int]:
    """Each requested method's chunk size; a method without sequential editing is refused."""
    from kedit_core.plugins import get_registry

    out = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method = get_registry().method(name)
        if not method.supports_sequential:
            raise SystemExit(f"method {name!r} does not support sequential editing")
        out[name] = args.batch if method.supports_batch else 1
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="grace", help="comma-separated, e.g. alphaedit,memit,grace,wise")
    ap.add_argument("--model", default="tiny", help="'tiny' (random LLaMA, small hparams) or a model name/path")
    ap.add_argument("--n", type=int, default=2000, help="edits in the stream")
    ap.add_argument("--start", type=int, default=0, help="first position of the stream")
    ap.add_argument("--every", type=int, default=200, help="score every K edits (and at the end)")
    ap.add_argument("--sample", type=int, default=50, help="edits scored per checkpoint")
    ap.add_argument("--batch", type=int, default=10, help="chunk size of methods that edit batches")
    ap.add_argument("--no-generation", action="store_true", help="teacher-forced protocol only")
    ap.add_argument("--drift-every-checkpoint", action="store_true", help="perplexity and answers at every checkpoint")
    ap.add_argument("--probe-n", type=int, default=300, help="unrelated prompts whose answers are compared")
    ap.add_argument("--window", type=int, default=256, help="perplexity window, tokens")
    ap.add_argument("--seed", type=int, default=0, help="the permutation the checkpoint samples are drawn from")
    ap.add_argument("--hparams", default=None, help='JSON overrides per method: {"grace": {"eps_init": 1.0}}')
    ap.add_argument("--out", default=None, help="JSON path (the PNG goes beside it)")
    ap.add_argument("--merge", nargs="+", type=Path, help="combine these runs' JSON into --out (nothing is run)")
    args = ap.parse_args(argv)
    if args.merge and not args.out:
        ap.error("--merge needs --out")
    if args.n < 0 or args.every < 1 or args.sample < 0 or args.batch < 1:
        ap.error("--n, --sample >= 0; --every, --batch >= 1")
    return args


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"wrote {out} and {plot(report, out.with_suffix('.png'))}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.merge:
        report = merge(args.merge)
        write(report, Path(args.out))
        return report
    logging.basicConfig(level=logging.WARNING)
    from kedit_core.architecture import resolve_architecture

    batches = method_batches(args)
    model, tok, info = load(args)
    requests, stream = stream_requests(args.n, args.start)
    limit = resolve_architecture(model).max_positions(model) or args.window
    perm = random.Random(args.seed).sample(range(args.n), args.n)
    setup = Setup(args, model, tok, info, requests, perm, window=min(args.window, limit))
    prepare(setup, batches)
    report: dict[str, Any] = {
        "model": args.model,
        "n": args.n,
        "every": args.every,
        "sample": args.sample,
        "batch": args.batch,
        "seed": args.seed,
        "generation": not args.no_generation,
        "stream": stream,
        "heldout": {"file": "kedit_core/data/heldout_text.txt", "window": setup.window},
        "probes": {"source": f"{PROBES} neighborhood prompts", "n": len(setup.probe_prompts)},
        "unedited": {
            "perplexity": setup.perplexity,
            "metrics": means([setup.pre[i] for i in sample_of(perm, args.n, args.sample)]),
        },
        "methods": {},
    }
    for name, batch in batches.items():
        report["methods"][name] = run_method(setup, name, batch)
    write(
        report, Path(args.out or ROOT / "benchmarks" / "results" / "stream" / f"{Path(args.model).name}-{args.n}.json")
    )
    return report


if __name__ == "__main__":
    main()
