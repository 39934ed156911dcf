"""Plot sequential-editing reports (JSON written by ``sequential_zsre.py`` or ``kedit eval --json``).

python kedit_grace/benchmarks/plot_runs.py out.png GRACE=grace_zsre.json MELO=melo_zsre.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kedit_core.evaluate.plot import plot_sequential


def main(argv: list[str]) -> None:
    out, *runs = argv
    results = []
    for run in runs:
        label, _, path = run.partition("=")
        results.append((label, json.loads(Path(path).read_text())))
    n = max(r["n"] for _, r in results)
    plot_sequential(results, out, title=f"Sequential ZsRE editing, Gemma 3 270M ({n} edits)")


if __name__ == "__main__":
    main(sys.argv[1:])
