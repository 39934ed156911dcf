"""Lifelong sequential editing on ZsRE (the GRACE/WISE protocol): edit N records one after another,
score each right after its edit and all of them on the final model; write the report as JSON.

    python kedit_grace/benchmarks/sequential_zsre.py grace --n 837 --out grace_zsre.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from kedit_core.editor import Editor
from kedit_core.request import load_requests

DATA = "zsre"  # shipped with kedit-core (kedit_core/data); a path works too


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--n", type=int, default=837)
    ap.add_argument("--start", type=int, default=0, help="first record (held-out slices)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", required=True)
    ap.add_argument("--patch", default=None, help="also save the final patch here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hparams", default=None, help="JSON overrides of the preset")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    requests = load_requests(args.data, limit=args.start + args.n)[args.start :]
    editor = Editor(args.method, "gemma3-270m")
    if args.hparams:
        editor.hparams = editor.hparams.updated(**json.loads(args.hparams))
    out = Path(args.out)
    t0 = time.perf_counter()

    def progress(done: int, result) -> None:
        if done % 25 == 0:
            post = result.metrics("post")
            logging.info(
                "%d edits, %.2f s/edit, rss %.0f MB, after-each %s",
                done,
                sum(result.edit_seconds) / done,
                result.rss_mb_curve[-1][1],
                {k: round(v, 3) for k, v in post.items()},
            )
            partial = {
                "n_done": done,
                "metrics_after_each": post,
                "post": result.post,
                "edit_seconds": result.edit_seconds,
                "rss_mb_curve": result.rss_mb_curve,
            }
            out.with_suffix(".partial.json").write_text(json.dumps(partial))

    result = editor.edit(requests, sequential=True, keep_original_weight=False, on_chunk=progress)
    report = result.to_report()
    report["wall_s"] = time.perf_counter() - t0
    report["hparams"] = editor.hparams.to_dict()
    final = result.patches[-1]
    report["final_patch"] = {
        "id": final.patch_id,
        "bytes": final.nbytes(),
        "tensors": {k: list(v.shape) for k, v in final.tensors.items()},
        "extra": {k: v for k, v in final.metadata["extra"].items() if k not in ("labels", "members")},
    }
    report["post_final_rows"] = result.post_final
    report["post_rows"] = result.post
    report["edit_seconds"] = result.edit_seconds
    if args.patch:
        final.save(args.patch)
    out.write_text(json.dumps(report, indent=1))
    logging.info("final %s", report["metrics"])
    logging.info("after each %s", report.get("metrics_after_each"))
    logging.info("%.2f s/edit, peak RSS %.0f MB", report["time_per_edit_s"], report["peak_rss_mb"])


if __name__ == "__main__":
    main()
