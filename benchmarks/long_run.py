"""Long sequential runs: memory every ``--every`` edits, against the size of the edits' own state.

Edits ZsRE records one after another (cycling through the file when ``--n`` exceeds it) with scoring
off, and records the process's resident memory, the bytes the edits themselves hold (the patches; for
methods whose patches each carry the whole state, the newest one) and the run's one-per-weight
snapshot. Prints a table and writes JSON.

    python benchmarks/long_run.py rome --model tiny --n 2000      # tiny random LLaMA, tiny hparams
    python benchmarks/long_run.py grace --model tiny --n 2000
    python benchmarks/long_run.py rome --model gemma3-270m --n 200 # the preset
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "zsre"  # shipped with kedit-core (kedit_core/data); a path works too
#: hyperparameters for the tiny random model (the presets are for real models)
TINY = {
    "rome": {
        "layers": [1],
        "v_num_grad_steps": 6,
        "v_lr": 0.5,
        "clamp_norm_factor": 50.0,
        "mom2_n_tokens": 400,
        "context_template_length_params": [[4, 2]],
    },
    "memit": {
        "layers": [1, 2],
        "mom2_update_weight": 100.0,
        "v_num_grad_steps": 6,
        "v_lr": 0.5,
        "clamp_norm_factor": 50.0,
        "mom2_n_tokens": 400,
        "context_template_length_params": [[4, 2]],
    },
    "alphaedit": {
        "layers": [2],
        "v_num_grad_steps": 6,
        "v_lr": 0.5,
        "clamp_norm_factor": 50.0,
        "mom2_n_tokens": 400,
        "context_template_length_params": [[4, 2]],
        "nullspace_threshold": 0.5,
        "nullspace_threshold_relative": True,
    },
    "grace": {"layer": 2, "eps_init": 0.01, "lr": 0.5, "max_steps": 8, "stop_loss": 0.0},
    "wise": {"layer": 2, "optimizer": "adam", "lr": 0.05, "max_steps": 8, "mask_ratio": 0.5, "stop_loss": 0.0},
    "melo": {
        "router_layer": 2,
        "lora_layers": [2, 3],
        "lr": 0.05,
        "max_steps": 8,
        "radius": 0.03,
        "cluster_radius": 0.0,
        "stop_loss": 0.0,
    },
    "ft-l": {"layers": [1], "lr": 0.05, "num_steps": 6},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--model", default="tiny", help="'tiny' (random LLaMA) or a model name/path")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--hparams", default=None, help="JSON object (default: tiny hparams or the preset)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from kedit_core.editor import Editor
    from kedit_core.efficiency import current_rss_mb
    from kedit_core.request import load_requests
    from kedit_core.testing import tiny_model

    records = load_requests(args.data)
    requests = [records[i % len(records)] for i in range(args.n)]
    hparams = json.loads(args.hparams) if args.hparams else (TINY.get(args.method) if args.model == "tiny" else None)
    if args.model == "tiny":
        model, tok = tiny_model("llama")
        editor = Editor(args.method, model, tok, hparams=hparams)
    else:
        editor = Editor(args.method, args.model, hparams=hparams)
    cumulative = editor.method.cumulative_patches
    rows = []
    t0 = time.perf_counter()
    start_rss = current_rss_mb()

    def state_mb(result) -> float:
        held = result.patches[-1:] if cumulative else result.patches
        return sum(p.nbytes() for p in held) / 2**20

    def metadata_mb(result) -> float:
        """JSON size of the patches' provenance (requests, hparams, fingerprints); Python holds it in
        dicts several times larger."""
        return sum(len(json.dumps(p.metadata, default=str)) for p in result.patches) / 2**20

    def checkpoint(done: int, result) -> None:
        if done % args.every and done != args.n:
            return
        row = {
            "edits": done,
            "rss_mb": round(current_rss_mb(), 1),
            "state_mb": round(state_mb(result), 2),
            "metadata_json_mb": round(metadata_mb(result), 2),
            "snapshot_mb": round(sum(t.numel() * t.element_size() for t in result.baseline.values()) / 2**20, 2),
            "s_per_edit": round(sum(result.edit_seconds) / done, 4),
        }
        rows.append(row)
        print(
            f"{row['edits']:>6} edits  rss {row['rss_mb']:>8.1f} MB  edits' state {row['state_mb']:>8.2f} MB  "
            f"metadata {row['metadata_json_mb']:>6.2f} MB  snapshot {row['snapshot_mb']:>7.2f} MB  "
            f"{row['s_per_edit']:.3f} s/edit",
            flush=True,
        )

    result = editor.edit(requests, sequential=True, keep_original_weight=False, evaluate=False, on_chunk=checkpoint)
    first, last = rows[0], rows[-1]
    growth = (last["rss_mb"] - first["rss_mb"]) - (last["state_mb"] - first["state_mb"])
    summary = {
        "method": args.method,
        "model": args.model,
        "n": args.n,
        "every": args.every,
        "hparams": hparams,
        "cumulative_patches": cumulative,
        "rss_before_mb": round(start_rss, 1),
        "rows": rows,
        "rss_growth_beyond_state_mb": round(growth, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"RSS growth from edit {first['edits']} to {last['edits']} beyond the edits' own state: {growth:.1f} MB")
    editor.restore(result)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"long_run_{args.method}_{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
