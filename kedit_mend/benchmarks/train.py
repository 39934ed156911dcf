"""Train MEND or KE on Gemma 3 270M with a small held-apart validation set (validation is a full
editing pass per record, so `kedit train`'s default 10% split is slow on a CPU).

    python kedit_mend/benchmarks/train.py --method mend --out runs/mend-gemma --max-steps 100

Training records: the first N-n_val records of zsre-train (and optionally
CounterFact's EasyEdit training split); validation: the last n_val. Never the evaluation file.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.datasets import data_dir
from kedit_core.method import EditContext
from kedit_core.models import cache_dir, load_model, model_fingerprint
from kedit_core.plugins import get_registry
from kedit_core.trainer import load_training_requests

DATA = data_dir()  # the records shipped with kedit-core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=None, help="use the first N training records (several epochs)")
    ap.add_argument("--counterfact", type=int, default=0, help="also train on the first N CounterFact training records")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="hyperparameter overrides key=value (JSON values)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    records = load_training_requests(DATA / "zsre_train.json")
    train, val = records[: -args.n_val][: args.n_train], records[-args.n_val :]
    if args.counterfact:
        train = train + load_training_requests(DATA / "counterfact_easyedit_train.json", args.counterfact)
    method = get_registry().method(args.method)
    model, tok, info = load_model(args.model)
    hp = method.load_hparams(None, info.key)
    changes = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.max_steps:
        changes["max_steps"] = args.max_steps
    hp = hp.updated(**changes) if changes else hp
    ctx = EditContext(
        model_id=info.id, model_fingerprint=model_fingerprint(model), cache_dir=cache_dir(), progress=True
    )
    trainer = method.trainer(
        model, tok, hp, resolve_architecture(model), ctx, train=train, val=val, out_dir=Path(args.out)
    )
    t0 = time.perf_counter()
    result = trainer.run()
    report = {
        "method": args.method,
        "model": info.id,
        "n_train": len(train),
        "n_val": len(val),
        "hparams": hp.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
        **result.as_dict(),
    }
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    print(json.dumps(result.history[-3:], indent=1))


if __name__ == "__main__":
    main()
