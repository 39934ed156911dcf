"""benchmarks/null_space_share.py on the tiny random LLaMA: shares are fractions of energy, a cutoff above
every eigenvalue reaches everything, and the corpus's own share is what C's eigenvalues say."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "null_space_share_benchmark", ROOT / "benchmarks" / "null_space_share.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def registry():
    import kedit_rome.plugin
    from kedit_core.plugins import reset_registry

    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_rome.plugin, name="rome", package="kedit-rome")
    yield reg
    reset_registry()


def test_share_is_the_fraction_of_energy_in_the_basis(bench):
    basis = torch.eye(3, dtype=torch.float64)[:, :1]  # the first axis
    keys = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert bench.share(keys, basis) == pytest.approx((9 / 25 + 0.0) / 2)
    assert bench.share(keys, basis[:, :0]) == 0.0


def test_tiny_run_reports_fractions_per_threshold(bench, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "share.json"
    report = bench.main(["--model", "tiny", "--n", "6", "--thresholds", "1000,0.001,0.0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    [layer] = report["layers"]
    assert layer["edit_keys"] == 6 and layer["text_tokens"] > 100
    everything, some, none = layer["rows"]
    assert everything["dims"] == layer["d_in"]
    for key in ("corpus", "edit_keys", "heldout_text"):
        assert everything[key] == pytest.approx(1.0)
        assert none[key] == 0.0
        assert 0.0 <= some[key] <= 1.0 + 1e-9
    assert none["dims"] == 0 and none["ratio"] is None
    assert everything["ratio"] == pytest.approx(1.0)
