"""Score an editing method on CounterFact records of the real model (each edit from the unedited
model unless --sequential; one batch of --batch-size edits for batch methods).

    python benchmarks/counterfact_eval.py rome --n 100 --out benchmarks/results/rome_cf100.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from kedit_core.editor import Editor
from kedit_core.request import load_requests

DATA = "counterfact"  # shipped with kedit-core (kedit_core/data); a path works too


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--no-generation", action="store_true", help="teacher-forced protocol only (faster)")
    ap.add_argument("--hparams", default=None, help="YAML/JSON file or inline JSON overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hp = None
    if args.hparams:
        hp = json.loads(args.hparams) if args.hparams.lstrip().startswith("{") else args.hparams
    editor = Editor(args.method, args.model, hparams=hp)
    if isinstance(hp, dict):
        editor.hparams = editor.method.load_hparams(
            {**editor.method.load_hparams(None, editor.model_info.key).to_dict(), **hp}
        )
    reqs = load_requests(args.data)[args.start : args.start + args.n]
    t0 = time.perf_counter()
    result = editor.edit(
        reqs, sequential=args.sequential, batch_size=args.batch_size, generation=not args.no_generation
    )
    report = result.to_report()
    report["wall_s"] = time.perf_counter() - t0
    report["hparams"] = editor.hparams.to_dict()
    summary = {
        k: report[k]
        for k in (
            "method",
            "n",
            "sequential",
            "batch_size",
            "metrics",
            "metrics_pre",
            "time_per_edit_s",
            "peak_rss_mb",
            "wall_s",
        )
    }
    if "metrics_after_each" in report:
        summary["metrics_after_each"] = report["metrics_after_each"]
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
