"""Peak resident memory of one ROME edit (no evaluation) against the model's float32 parameters, by phase:
importing torch and transformers, loading the model and tokenizer, the first edit (one-time key statistics
and context templates, from the cache when present), and a second edit (the steady state).

    python benchmarks/edit_memory.py --model gemma3-270m qwen2.5-0.5b --out benchmarks/results/edit_memory.json

Each model runs in its own process (RSS is per process); RSS is sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REQUESTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "Toyota is a company headquartered in", "subject": "Toyota", "target_new": "Berlin"},
]


def measure(model_name: str, method: str) -> dict:
    """Run in a fresh process: the phases' peak RSS in MB."""
    import psutil

    proc, phase, peaks = psutil.Process(), ["import"], {}

    def sample() -> None:
        while True:
            rss = proc.memory_info().rss / 2**20
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    from kedit_core.editor import Editor

    time.sleep(0.05)
    phase[0] = "load"
    editor = Editor(method=method, model=model_name)
    params = sum(p.numel() * p.element_size() for p in editor.model.parameters()) / 2**20
    for name, request in zip(("first edit", "second edit"), REQUESTS, strict=True):
        time.sleep(0.05)
        phase[0] = name
        editor.edit([request], evaluate=False)
    time.sleep(0.05)
    peak = max(peaks.values())
    return {
        "model": model_name,
        "method": method,
        "params_mb": round(params),
        "peak_mb": round(peak),
        "peak_over_params": round(peak / params, 2),
        "phases_mb": {k: round(v) for k, v in peaks.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["gemma3-270m"])
    ap.add_argument("--method", default="rome")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model[0], args.method)))
        return
    rows = []
    for name in args.model:
        cmd = [sys.executable, __file__, "--one", "--model", name, "--method", args.method]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print("| model | method | float32 parameters (MB) | " + " | ".join(rows[0]["phases_mb"]) + " | peak / parameters |")
    print("|---|---|---|" + "---|" * (len(rows[0]["phases_mb"]) + 1))
    for r in rows:
        phases = " | ".join(str(v) for v in r["phases_mb"].values())
        print(f"| {r['model']} | {r['method']} | {r['params_mb']} | {phases} | {r['peak_over_params']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
