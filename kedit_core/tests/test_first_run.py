"""A new user's first run: the CLI starts without torch, input errors come before any model load, model
fingerprints are computed once per model directory, and `kedit edit` says where its time went."""

import json
import os
import subprocess
import sys

import pytest

from kedit_core import editor, models
from kedit_core.cli import main
from kedit_core.patch import tensor_fingerprint
from kedit_core.testing import tiny_model

EDIT = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome"]
HP = "layers: [1, 2]\nlr: 0.05\nnum_steps: 15\n"

pytestmark = pytest.mark.usefixtures("ft_plugin")


def _run_cli_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``main(args)`` in a fresh interpreter with every installed plugin; fails if torch or
    transformers got imported."""
    code = (
        "import sys\nfrom kedit_core.cli import main\nrc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(rc)\n"
    )
    env = {**os.environ, "KEDIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "args, rc, says",
    [
        (["--help"], 0, "Commands:"),
        (["methods"], 0, "rome"),
        (["methods", "--json"], 0, '"ft-m"'),
        (["edit", "--method", "no-such", *EDIT], 1, "unknown method 'no-such'"),
        (["eval", "--method", "rome", "--data", "no-such.json"], 1, "data file not found"),
        (["eval", "--method", "rome", "--data", "zsre", "--limit", "0"], 2, "--limit must be at least 1"),
        (
            ["edit", "--method", "rome", "--prompt", "a b", "--subject", "zz", "--target", "c"],
            1,
            "does not occur in prompt",
        ),
        (["edit", "--method", "rome", *EDIT, "--dtype", "float8"], 1, "unknown dtype"),
    ],
)
def test_cli_answers_without_importing_torch(args, rc, says):
    done = _run_cli_without_torch(args)
    assert done.returncode == rc, (done.stdout, done.stderr)
    assert says in done.stdout + done.stderr
    assert "HEAVY []" in done.stderr


def test_bad_data_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(editor, "load_model", no_load)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "x"}]')
    assert main(["eval", "--method", "ft-m", "--model", str(tmp_path), "--data", str(bad)]) == 1
    assert "record 0" in capsys.readouterr().err
    hp = tmp_path / "hp.yaml"
    hp.write_text("no_such_knob: 1\n")
    assert main(["edit", "--method", "ft-m", "--model", str(tmp_path), *EDIT, "--hparams", str(hp)]) == 1
    assert "unknown field 'no_such_knob'" in capsys.readouterr().err


@pytest.fixture()
def converted(tmp_path, monkeypatch):
    """A tiny model in kedit's own model cache (as a dequantized GGUF would be), and the cache root."""
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / "models" / "tiny"
    model, tok = tiny_model("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_fingerprints_are_computed_once_per_model_directory(converted, monkeypatch):
    _, _, first = models.load_model(str(converted))
    calls = []
    with monkeypatch.context() as patched:
        patched.setattr(models, "model_fingerprint", lambda m: calls.append(1) or "recomputed")
        loaded, _, again = models.load_model(str(converted))
    assert again.fingerprint == first.fingerprint and calls == []
    assert models.model_fingerprint(loaded) == first.fingerprint  # the cached value is the real one
    params = models.known_parameter_fingerprints(str(converted))
    assert set(params) >= {name for name, _ in loaded.named_parameters()}
    # rewriting the weights invalidates the cache: both fingerprints are taken anew from the new weights
    loaded.model.norm.weight.data.add_(1.0)
    loaded.save_pretrained(converted)
    reloaded, _, changed = models.load_model(str(converted))
    assert changed.fingerprint != first.fingerprint == again.fingerprint
    new_params = models.known_parameter_fingerprints(str(converted))
    assert new_params["model.norm.weight"] == tensor_fingerprint(reloaded.model.norm.weight)
    assert new_params["model.norm.weight"] != params["model.norm.weight"]


def test_patch_for_other_weights_is_refused_before_the_model_loads(converted, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    hp = tmp_path / "ft.yaml"
    hp.write_text(HP)
    foreign, own = tmp_path / "foreign.kedit.safetensors", tmp_path / "own.kedit.safetensors"
    assert (
        main(["edit", "--method", "ft-m", "--model", str(other), *EDIT, "--hparams", str(hp), "--out", str(foreign)])
        == 0
    )
    assert (
        main(["edit", "--method", "ft-m", "--model", str(converted), *EDIT, "--hparams", str(hp), "--out", str(own)])
        == 0
    )
    capsys.readouterr()
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert main(["patch", "apply", str(foreign), "--model", str(converted)]) == 1
    err = capsys.readouterr().err
    assert "computed on other weights" in err and "before loading the model" in err
    monkeypatch.setattr(models, "load_model", real_load)
    assert main(["patch", "apply", str(own), "--model", str(converted)]) == 0


def test_edit_reports_where_the_time_went(tmp_path, capsys):
    path = tmp_path / "m"
    model, tok = tiny_model("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    hp = tmp_path / "ft.yaml"
    hp.write_text(HP)
    out = tmp_path / "p.kedit.safetensors"
    assert (
        main(
            ["edit", "--method", "ft-m", "--model", str(path), *EDIT, "--hparams", str(hp), "--out", str(out), "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    t = report["time"]
    steps = [p["step"] for p in t["phases"]]
    assert steps[0] == f"loading {path}" and any(s.startswith("editing with ft-m") for s in steps)
    assert 0 <= t["edit_itself_s"] <= report["edit_seconds"] and t["one_time"] == []
    assert t["total_s"] == pytest.approx(sum(p["seconds"] for p in t["phases"]))
