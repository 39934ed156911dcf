"""The EasyEdit paper's Table 1 on this machine: editing speed and memory per method.

Runs each named method through ``Editor.edit`` on CounterFact edits of the real model (each edit
from the unedited model; batch methods also as one batch) and prints a table -- method, mode,
seconds per edit (median), peak RSS -- plus efficacy, and writes JSON. Each method runs in its own
process so that peak RSS is that method's alone.

    python benchmarks/table1.py rome memit pmet kn ft-l ft-m --n 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
OUT = Path(__file__).resolve().parent / "results" / "table1.json"


def run_one(method: str, mode: str, n: int, model: str, data: str) -> dict:
    """Edit in a child process (so peak RSS is per method); returns its JSON line."""
    code = f"""
import json, statistics
from kedit_core.editor import Editor
from kedit_core.request import load_requests
ed = Editor({method!r}, {model!r})
reqs = load_requests({data!r})[:{n}]
mode = {mode!r}
res = ed.edit(reqs, batch_size=len(reqs) if mode == "batch" else 1)
per_edit = [s / len(reqs) for s in res.edit_seconds] if mode == "batch" else res.edit_seconds
rep = res.to_report()
print("@@" + json.dumps({{"method": {method!r}, "mode": mode, "n": len(reqs),
    "s_per_edit_median": statistics.median(per_edit), "s_per_edit_mean": res.time_per_edit_s,
    "peak_rss_mb": res.peak_rss_mb, "efficacy_score": rep["metrics"].get("efficacy_score"),
    "paraphrase_score": rep["metrics"].get("paraphrase_score"),
    "neighborhood_score": rep["metrics"].get("neighborhood_score")}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    return {"method": method, "mode": mode, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def modes_of(method: str) -> list[str]:
    from kedit_core.plugins import get_registry

    return ["single", "batch"] if get_registry().method(method).supports_batch else ["single"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help="registered method names, e.g. rome memit pmet kn ft-l ft-m")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = []
    for method in args.methods:
        for mode in modes_of(method):
            rows.append(run_one(method, mode, args.n, args.model, args.data))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'method':<8} {'mode':<7} {'s/edit (median)':>16} {'peak RSS (MB)':>14} {'efficacy':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<8} {r['mode']:<7} error: {r['error']}")
            continue
        eff = r["efficacy_score"]
        print(f"{r['method']:<8} {r['mode']:<7} {r['s_per_edit_median']:>16.2f} {r['peak_rss_mb']:>14.0f} "
              f"{'' if eff is None else f'{eff:.2f}':>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
