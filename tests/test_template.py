"""plugins/template is a working starting point: rendered under a new name, it installs, `kedit methods`
lists it, and its MethodConformance tests pass."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "plugins" / "template"
RENAMES = [
    ("kedit_example", "kedit_acme"),
    ("kedit-example", "kedit-acme"),
    ("grad-step", "acme-step"),
    ("example = ", "acme = "),
]


def render(dest: Path) -> Path:
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for path in sorted(dest.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            text = path.read_text()
            for old, new in RENAMES:
                text = text.replace(old, new)
            path.write_text(text)
        new_name = path.name
        for old, new in RENAMES[:3]:
            new_name = new_name.replace(old, new)
        if new_name != path.name:
            path.rename(path.with_name(new_name))
    return dest


def test_template_renders_installs_and_passes_conformance(tmp_path):
    pkg = render(tmp_path / "kedit-acme")
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "KEDIT_DISABLE_PLUGIN_AUTOLOAD": "",
    }
    listed = subprocess.run(
        [sys.executable, "-c", "from kedit_core.cli import entry; entry()", "methods", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    data = json.loads(listed.stdout)
    [row] = [m for m in data["methods"] if m["method"] == "acme-step"]
    assert row["package"] == "kedit-acme" and row["version"] == "0.1.0" and row["presets"] == ["default"]
    assert data["broken"] == []
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
