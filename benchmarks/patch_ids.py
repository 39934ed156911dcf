"""The content id of every method's patch on the tiny models, as a guard for refactors that must not
change behaviour: the id hashes the patch's tensors (bit for bit) and its provenance, so equal ids before
and after a change mean the methods computed exactly the same edits.

    OMP_NUM_THREADS=1 python benchmarks/patch_ids.py [--out FILE] [--compare OLD.json]

Compare runs made with the same number of torch threads: float reductions, and so the ids, depend on it.

Each method edits the tiny GPT-2, LLaMA and Gemma 3 models (``kedit_core.testing``) with the first tiny
request, from the unedited model, with the small hyperparameters its conformance tests use; trained
methods start from their untrained networks (seeded). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_VALUE = {"v_num_grad_steps": 5, "early_stop_nll": 0.0}
HPARAMS = {
    "rome": {"layers": [1], **TINY_VALUE},
    "memit": {"layers": [1, 2], "mom2_update_weight": 100.0, **TINY_VALUE},
    "pmet": {"layers": [1, 2], "mom2_update_weight": 100.0, **TINY_VALUE},
    "alphaedit": {"layers": [1, 2], "nullspace_threshold": 0.5, "nullspace_threshold_relative": True, **TINY_VALUE},
    "kn": {"steps": 4, "prompt_prefixes": ["", "Fact: "]},
    "mend": {"layers": [2, 3], "rank": 8},
    "ke": {"layers": [2, 3], "lstm_hidden": 8, "cond_dim": 8, "head_hidden": 8},
    "serac": {"n_demonstrations": 1},
    "ike": {"k": 2, "pool": str(ROOT / "kedit_serac" / "tests" / "data" / "pool.json")},
    "grace": {"layer": 2, "eps_init": 0.01, "lr": 0.5, "max_steps": 8, "stop_loss": 0.0},
    "melo": {
        "router_layer": 2,
        "lora_layers": [2, 3],
        "lr": 0.05,
        "max_steps": 8,
        "radius": 0.03,
        "cluster_radius": 0.0,
        "stop_loss": 0.0,
    },
    "ft-l": {"layers": [1], "lr": 0.05, "num_steps": 4},
    "ft-m": {"layers": [1, 2], "lr": 0.05, "num_steps": 4},
}


def patch_ids(cache: Path) -> dict[str, dict[str, str]]:
    import torch

    from kedit_core.architecture import resolve_architecture
    from kedit_core.method import EditContext
    from kedit_core.plugins import get_registry
    from kedit_core.testing import FAMILIES, tiny_model, tiny_requests

    out: dict[str, dict[str, str]] = {}
    for name, hp in HPARAMS.items():
        method = get_registry().method(name)
        out[name] = {}
        for family in FAMILIES:
            torch.manual_seed(0)
            model, tok = tiny_model(family)
            ctx = EditContext(model_id="tiny", cache_dir=cache / family)
            try:
                patch = method.compute_patch(
                    model, tok, tiny_requests()[:1], method.load_hparams(hp), resolve_architecture(model), ctx
                )
                out[name][family] = patch.patch_id
            except Exception as exc:  # recorded: an error is a result to compare too
                out[name][family] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            print(f"{name:6s} {family:7s} {out[name][family]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default=None, help="a JSON written by an earlier run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ids = patch_ids(Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(ids, indent=1, sort_keys=True))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        diff = [
            (m, f, old.get(m, {}).get(f), i)
            for m, fam in ids.items()
            for f, i in fam.items()
            if old.get(m, {}).get(f) != i
        ]
        for m, f, a, b in diff:
            print(f"CHANGED {m} {f}: {a} -> {b}")
        n = sum(len(f) for f in ids.values())
        print(f"{n - len(diff)} of {n} patch ids equal")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
