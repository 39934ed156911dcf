"""Fuzz the loaders with many generated inputs: the property tests of ``kedit_core/tests/test_fuzz.py``
run with ``KEDIT_FUZZ_EXAMPLES`` cases each (default 10,000; CI runs 150), and so do the malformed
trained-editor checkpoint properties of ``kedit_mend/tests/test_checkpoint_fuzz.py``. Prints a table of
the cases tried per property and writes JSON.

    python benchmarks/fuzz_loaders.py --examples 10000 --out benchmarks/results/fuzz_loaders.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "kedit_core" / "tests" / "test_fuzz.py"
#: which loader each property exercises (``test_apply_*``: hand-edited patches with a recomputed id --
#: forged fingerprints / post-edit fingerprints / wrapped modules, tied weights -- refused at apply or revert
#: with the model bit-identical; they run KEDIT_FUZZ_EXAMPLES // 10 cases each)
LOADER = {
    "patch": "patch loader",
    "request": "request loader",
    "hparams": "hyperparameter loader",
    "apply": "patch apply/revert checks",
    "checkpoint": "trained-editor checkpoint loader",
}
#: malformed MEND checkpoints (random, truncated, flipped model.safetensors; random and mutated config.json)
CHECKPOINT_TESTS = ROOT / "kedit_mend" / "tests" / "test_checkpoint_fuzz.py"
STAT = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,? (?:and )?(\d+) invalid")


def parse(output: str) -> dict[str, dict[str, int]]:
    """Per test: passing / failing / invalid examples summed over hypothesis's phases."""
    stats: dict[str, dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        head = re.match(r"^\S*test_\w*fuzz\.py::(\w+):\s*$", line.strip())
        if head:
            current = head.group(1)
            stats.setdefault(current, {"passing": 0, "failing": 0, "invalid": 0})
            continue
        m = STAT.search(line)
        if m and current:
            for key, value in zip(("passing", "failing", "invalid"), m.groups(), strict=False):
                stats[current][key] += int(value)
    return stats


def checkpoint_fuzz(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The trained-editor checkpoint properties (kedit_mend's tests), run like those of test_fuzz.py."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(CHECKPOINT_TESTS),
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_loaders.json"))
    args = ap.parse_args()
    env = {**os.environ, "KEDIT_FUZZ_EXAMPLES": str(args.examples)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS), "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    ckpt = checkpoint_fuzz(env)
    wall = time.perf_counter() - t0
    stats = {**parse(proc.stdout), **parse(ckpt.stdout)}
    if ckpt.returncode != 0:
        print(ckpt.stdout[-3000:])
        proc.returncode = proc.returncode or ckpt.returncode
    rows = []
    for test, s in sorted(stats.items()):
        loader = next((v for k, v in LOADER.items() if test.startswith(f"test_{k}")), "other")
        rows.append({"loader": loader, "property": test, **s, "cases": s["passing"] + s["failing"] + s["invalid"]})
    per_loader: dict[str, int] = {}
    for r in rows:
        per_loader[r["loader"]] = per_loader.get(r["loader"], 0) + r["cases"]
    print(f"{'loader':<22} {'property':<58} {'cases':>7} {'failing':>8}")
    for r in rows:
        print(f"{r['loader']:<22} {r['property']:<58} {r['cases']:>7} {r['failing']:>8}")
    print()
    for loader, n in per_loader.items():
        print(f"{loader:<22} {n:>7} cases")
    print(f"pytest exit {proc.returncode}, {wall:.0f} s")
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "examples_per_property": args.examples,
                "pytest_exit": proc.returncode,
                "wall_s": round(wall, 1),
                "per_loader": per_loader,
                "rows": rows,
            },
            indent=1,
        )
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
