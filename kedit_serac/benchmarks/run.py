"""Benchmark SERAC / IKE on Gemma 3 270M with the EasyEdit token-accuracy protocol.

    python kedit_serac/benchmarks/run.py serac --data zsre --n 200 --batch-size 200
    python kedit_serac/benchmarks/run.py ike --data counterfact --n 100

Prints the metric table, time per edit, time per evaluated query (edited vs unedited model, on the
first --query-n requests), peak RSS; writes the full report as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import time

from kedit_core.editor import Editor
from kedit_core.evaluate import Evaluator
from kedit_core.models import load_model
from kedit_core.request import load_requests


def query_count(requests) -> int:
    n = 0
    for r in requests:
        n += 1 + len(r.rephrase_prompts) + len(r.locality) + len(r.portability)
        if r.ground_truth:
            n += 1 + len(r.rephrase_prompts) + 2 * len(r.neighborhood_prompts)
    return n


def time_queries(model, tok, requests, patch=None, generation=True) -> float:
    ev = Evaluator(model, tok, generation=generation)
    t0 = time.perf_counter()
    if patch is None:
        ev.evaluate(requests)
    else:
        with patch.applied(model, tokenizer=tok):
            ev.evaluate(requests)
    return (time.perf_counter() - t0) / max(1, query_count(requests))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["serac", "ike"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--start", type=int, default=0, help="first record (held-out checks: --start 100)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--pool", default=None, help="IKE demonstration pool (default: the packaged one)")
    ap.add_argument("--k", type=int, default=None, help="IKE demonstrations")
    ap.add_argument("--scope", choices=["subject", "all"], default=None, help="IKE scope gate (default: the preset's)")
    ap.add_argument("--query-n", type=int, default=20)
    ap.add_argument("--no-generation", action="store_true", help="teacher-forced protocol only (no greedy decoding)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok, info = load_model("gemma3-270m")
    reqs = load_requests(args.data, limit=args.start + args.n)[args.start :]
    hp = None
    if args.method == "ike":
        from kedit_serac.ike import IKE

        hp = IKE.load_hparams(None, info.key).updated(
            **{k: v for k, v in {"pool": args.pool, "k": args.k, "scope": args.scope}.items() if v is not None}
        )
    editor = Editor(args.method, model, tok, hparams=hp, model_info=info, checkpoint=args.checkpoint)
    t0 = time.perf_counter()

    def progress(done: int, partial) -> None:  # running metrics, so a long run can be read while it goes
        if args.out:
            snapshot = {
                "done": done,
                "metrics": partial.metrics("post"),
                "metrics_pre": partial.metrics("pre"),
                "time_per_edit_s": sum(partial.edit_seconds) / done,
                "wall_s": time.perf_counter() - t0,
            }
            with open(args.out + ".partial", "w", encoding="utf-8") as fh:
                json.dump(snapshot, fh, indent=1)

    result = editor.edit(reqs, batch_size=args.batch_size, on_chunk=progress, generation=not args.no_generation)
    wall = time.perf_counter() - t0
    report = result.to_report()
    sub = reqs[: args.query_n]
    patch = editor.compute_patch(sub) if editor.method.supports_batch else editor.compute_patch(sub[:1])
    report["time_per_query_s"] = {
        "edited": time_queries(model, tok, sub, patch, not args.no_generation),
        "unedited": time_queries(model, tok, sub, generation=not args.no_generation),
    }
    report["wall_s"] = wall
    report["data"] = args.data
    report["records"] = [args.start, args.start + len(reqs)]
    report["protocol"] = "teacher-forced" if args.no_generation else "teacher-forced + generation"
    print(
        f"{args.method} on {info.id}: records [{args.start}, {args.start + len(reqs)}) of {args.data}, batch size {report['batch_size']}"
    )
    for name in report["metrics"]:
        print(
            f"  {name:20s} pre {report['metrics_pre'].get(name, float('nan')):.3f}  post {report['metrics'][name]:.3f}"
        )
    print(
        f"  time per edit {report['time_per_edit_s']:.3f} s; per evaluated query {report['time_per_query_s']['edited']:.3f} s "
        f"(unedited {report['time_per_query_s']['unedited']:.3f} s); peak RSS {report['peak_rss_mb']:.0f} MB; wall {wall:.0f} s"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
