"""MEND and KE on ZsRE (the first N records of zsre), each edit from the unedited
model, with the shipped checkpoints; one model load for all runs. Writes one JSON report per run.

    python kedit_mend/benchmarks/zsre_eval.py --out runs/ --runs mend:100:1 ke:50:1 mend:100:10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kedit_core.datasets import data_dir
from kedit_core.editor import Editor
from kedit_core.models import load_model
from kedit_core.request import load_requests

DATA = data_dir()  # the records shipped with kedit-core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", default=["mend:200:1"], help="method:n_records:batch_size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, info = load_model("gemma3-270m")
    for run in args.runs:
        method, n, bs = run.split(":")
        reqs = load_requests(DATA / "zsre.json", limit=int(n))
        t0 = time.perf_counter()
        result = Editor(method, model, tok, model_info=info).edit(reqs, batch_size=int(bs))
        report = result.to_report()
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / f"{method}-zsre{n}-bs{bs}.json").write_text(json.dumps(report, indent=1))
        print(
            method,
            n,
            bs,
            {k: round(v, 3) for k, v in report["metrics"].items()},
            "s/edit",
            round(report["time_per_edit_s"], 3),
            "peak_rss_mb",
            round(report["peak_rss_mb"]),
            "wall",
            report["wall_s"],
            flush=True,
        )


if __name__ == "__main__":
    main()
