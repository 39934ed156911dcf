"""A new user's first hour, timed: a fresh clone, ``make install``, ``kedit --help``, a cached model load
(kedit against plain transformers, in the same run) and ``make demo`` (first run, then again).

    python benchmarks/first_hour.py [--runs 3] [--out benchmarks/results/first_hour.json]

The clone goes into a new temporary directory with nothing beside it, with its own model cache
(``KEDIT_CACHE``), so the first ``make demo`` pays every one-time step. Prints a table and writes JSON.
Say in any figure quoted from it what else ran on the machine (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN_LOAD = """
import sys, time
t0 = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model.eval()
print(time.perf_counter() - t1, t1 - t0)
"""

KEDIT_LOAD = """
import sys, time
t0 = time.perf_counter()
from kedit_core.models import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer  # what load_model uses: import time, as above
t1 = time.perf_counter()
model, tokenizer, info = load_model("gemma3-270m")
assert info.fingerprint
print(time.perf_counter() - t1, t1 - t0)
"""


def timed(cmd: list[str] | str, cwd: Path, env: dict[str, str], log: Path | None = None) -> float:
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        subprocess.run(
            cmd, cwd=cwd, env=env, check=True, stdout=out, stderr=subprocess.STDOUT, shell=isinstance(cmd, str)
        )
    finally:
        if log:
            out.close()
    return time.perf_counter() - start


def load_times(python: str, script: str, arg: str, cwd: Path, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run([python, "-c", script, arg], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load, imports = map(float, done.stdout.split()[-2:])
    return {"process_s": wall, "load_s": load, "import_s": imports}


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions of --help and of each model load")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_hour.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kedit-first-hour-"))
    clone = work / "kedit"
    env = {**os.environ, "KEDIT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("KEDIT_DISABLE_PLUGIN_AUTOLOAD", None)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": os.getloadavg(),
        },
        "work_dir": str(work),
    }
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    report["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()
    print(f"fresh clone of {report['commit'][:12]} in {clone}", file=sys.stderr)

    report["make_install_s"] = timed(["make", "install"], clone, env, work / "install.log")
    kedit, python = str(clone / ".venv" / "bin" / "kedit"), str(clone / ".venv" / "bin" / "python")
    report["kedit_help_s"] = summary([timed([kedit, "--help"], clone, env) for _ in range(args.runs)])
    report["kedit_methods_s"] = summary([timed([kedit, "methods"], clone, env) for _ in range(args.runs)])
    imported = (
        subprocess.run(
            [
                python,
                "-c",
                "import sys; from kedit_core.cli import main; main(['methods']); "
                "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))",
            ],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    report["kedit_methods_imports"] = imported

    report["make_demo_first_s"] = timed(["make", "demo"], clone, env, work / "demo_first.log")
    report["make_demo_again_s"] = timed(["make", "demo"], clone, env, work / "demo_again.log")
    report["demo_output"] = (work / "demo_again.log").read_text().splitlines()[-22:]
    report["demo_first_output"] = (work / "demo_first.log").read_text().splitlines()[-6:]

    cached = str(work / "cache" / "models" / "gemma3-270m")
    plain, ours = [], []
    for _ in range(args.runs):  # alternate, so that a change of load on the machine hits both alike
        plain.append(load_times(python, PLAIN_LOAD, cached, clone, env))
        ours.append(load_times(python, KEDIT_LOAD, cached, clone, env))
    report["load_plain"] = {k: summary([r[k] for r in plain]) for k in plain[0]}
    report["load_kedit"] = {k: summary([r[k] for r in ours]) for k in ours[0]}
    report["load_ratio_median"] = {
        k: report["load_kedit"][k]["median"] / report["load_plain"][k]["median"] for k in ("load_s", "process_s")
    }
    report["machine"]["load_average_after"] = os.getloadavg()

    rows = [
        ("make install (fresh venv)", report["make_install_s"]),
        ("kedit --help (median)", report["kedit_help_s"]["median"]),
        ("kedit methods (median)", report["kedit_methods_s"]["median"]),
        ("make demo, first run", report["make_demo_first_s"]),
        ("make demo, again", report["make_demo_again_s"]),
        ("cached load, plain transformers (median)", report["load_plain"]["load_s"]["median"]),
        ("cached load, kedit (median)", report["load_kedit"]["load_s"]["median"]),
    ]
    for name, seconds in rows:
        print(f"{name:45s} {seconds:8.2f} s")
    print(
        f"{'kedit / plain load (in-process, whole process)':45s} "
        f"{report['load_ratio_median']['load_s']:.2f}x, {report['load_ratio_median']['process_s']:.2f}x"
    )
    print(f"{'kedit methods imported':45s} {imported}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
