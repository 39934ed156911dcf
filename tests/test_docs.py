"""The 'Writing an editor' guide states every hookspec with the code's exact signature."""

import inspect
import re
from pathlib import Path

from kedit_core import hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-an-editor.md"


def code_hookspecs() -> dict[str, str]:
    out = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "kedit_spec"):
            out[name] = f"def {name}{inspect.signature(fn)}:"
    return out


def test_every_hookspec_is_in_the_guide_with_its_signature():
    text = GUIDE.read_text()
    documented = {name: line for line, name in re.findall(r"^(def (\w+)\(.*\):)$", text, flags=re.M)}
    specs = code_hookspecs()
    assert specs, "no hookspecs found"
    assert documented == specs


def test_readme_bench_section_is_the_rendered_bench_json():
    """The README's tables are `kedit bench` output: re-rendering the committed JSON gives the section."""
    import json

    from kedit_core.bench.report import readme_section, render_markdown

    root = Path(__file__).resolve().parent.parent
    doc = json.loads((root / "benchmarks" / "results" / "bench" / "bench.json").read_text())
    section = readme_section(root / "README.md")
    assert section == render_markdown(doc, "benchmarks/results/bench/sequential.png" if doc["sequential"] else None)
    assert doc["table1"] and all(r["method"] for r in doc["table1"])


def test_nothing_tracked_reads_the_workspace_next_to_the_clone():
    """A clone from GitHub has nothing beside it: data, docs and scripts use the copies in the repository
    (kedit_core/data). Results JSON are records of past runs and may name where their data was then."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    word = "sha" + "red"  # spelled apart so that this file does not match itself
    pattern = re.compile(rf"\.\./{word}|[\"']{word}[\"'] / [\"']data[\"']")
    offenders = []
    for name in tracked:
        path = root / name
        if "/results/" in f"/{name}" or path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ""}:
            continue
        if path.is_file() and pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(name)
    assert offenders == []
