"""The conformance matrix: every registered method on one model, each with that model's preset, the same
CounterFact records each edited from the unedited model and scored with both protocols; one row per
method -- runs (or the error), scores, seconds per edit -- and whether the model came back bit-exact.

    python benchmarks/conformance.py --model qwen2.5-0.5b --n 5 --out benchmarks/results/conformance/qwen2.5-0.5b.json

The JSON is rewritten after every method, so an interrupted run keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from kedit_core.editor import Editor
from kedit_core.models import load_model
from kedit_core.plugins import get_registry
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

COLUMNS = [
    ("ES", "efficacy_score"),
    ("PS", "paraphrase_score"),
    ("NS", "neighborhood_score"),
    ("rel", "reliability"),
    ("GEN rel", "gen_reliability"),
    ("GEN gen", "gen_generalization"),
    ("GEN loc", "gen_locality"),
    ("degen", "degenerate"),
]


def run_method(name: str, loaded: tuple, requests: list, generation: bool) -> dict:
    """One method's row: its scores on ``requests`` (each edit from the unedited model), or its error."""
    model, tok, info = loaded
    before = state_fingerprint(model)
    t0 = time.perf_counter()
    try:
        editor = Editor(name, model, tok, model_info=info)
        result = editor.edit(requests, batch_size=1, generation=generation)
    except Exception as exc:  # a method that does not run on this model is a row of the matrix, not a crash
        return {"method": name, "runs": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    report = result.to_report()
    return {
        "method": name,
        "runs": True,
        "restored": state_fingerprint(model) == before,
        "metrics": report["metrics"],
        "metrics_pre": report["metrics_pre"],
        "time_per_edit_s": report["time_per_edit_s"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": report["peak_rss_mb"],
        "hparams": editor.hparams.to_dict(),
    }


def table(rows: list[dict]) -> str:
    head = "| method | runs | " + " | ".join(c for c, _ in COLUMNS) + " | s/edit |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    ran = [row for row in rows if row["runs"]]
    if ran:  # every method scored the same requests on the same unedited model
        pre = ran[0]["metrics_pre"]
        lines.append(
            "| unedited model | - | " + " | ".join(f"{pre[k]:.2f}" if k in pre else "-" for _, k in COLUMNS) + " | - |"
        )
    for row in rows:
        if not row["runs"]:
            lines.append(f"| {row['method']} | no: {row['error'][:60]} |" + " |" * (len(COLUMNS) + 1))
            continue
        m = row["metrics"]
        cells = [f"{m[k]:.2f}" if k in m else "-" for _, k in COLUMNS]
        runs = "yes" if row["restored"] else "yes (NOT restored)"
        lines.append(f"| {row['method']} | {runs} | " + " | ".join(cells) + f" | {row['time_per_edit_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--no-generation", action="store_true", help="teacher-forced protocol only (faster)")
    ap.add_argument("--out", help="the JSON report (required unless --render)")
    ap.add_argument("--render", metavar="JSON", help="print the table of a report written earlier, and stop")
    args = ap.parse_args()
    if args.render:
        print(table(json.loads(Path(args.render).read_text())["rows"]))
        return
    if not args.out:
        ap.error("--out is required")
    methods = args.methods or sorted(get_registry().methods)
    requests = load_requests(args.data, limit=args.n)
    loaded = load_model(args.model)
    report = {"model": args.model, "data": args.data, "n": args.n, "protocol": "each edit from the unedited model"}
    rows: list[dict] = []
    for name in methods:
        print(f"== {name}", flush=True)
        rows.append(run_method(name, loaded, requests, not args.no_generation))
        Path(args.out).write_text(json.dumps({**report, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
