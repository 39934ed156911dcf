"""benchmarks/stream.py end to end on the tiny random LLaMA: the stream, the checkpoints, the JSON and
the figure; and a stream of no edits, whose measurements must equal the unedited model's. Also
benchmarks/null_space_share.py (AlphaEdit's null space against the stream's edit keys): shares are
fractions of energy, a cutoff above every eigenvalue reaches everything."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stream():
    yield _script("stream_benchmark", "stream.py")
    sys.modules.pop("stream_benchmark", None)


@pytest.fixture(scope="module")
def null_space():
    yield _script("null_space_share_benchmark", "null_space_share.py")
    sys.modules.pop("null_space_share_benchmark", None)


@pytest.fixture(scope="module")
def registry():
    """The global registry holding the two plugins these runs use (the test session turns autoload off)."""
    import kedit_grace.plugin
    import kedit_rome.plugin
    from kedit_core.plugins import reset_registry

    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_rome.plugin, name="rome", package="kedit-rome")
    reg.add_plugin(kedit_grace.plugin, name="grace", package="kedit-grace")
    yield reg
    reset_registry()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))


def test_checkpoints_and_samples(stream):
    assert stream.checkpoint_counts(12, 4, 1) == [4, 8, 12]
    assert stream.checkpoint_counts(10, 4, 3) == [6, 9, 10]  # first chunk end at or past 4, 8; the end
    assert stream.checkpoint_counts(0, 4, 3) == [0]
    perm = list(range(20))[::-1]
    assert stream.sample_of(perm, 5, 3) == [2, 3, 4]
    assert stream.sample_of(perm, 2, 3) == [0, 1]


def test_the_stream_interleaves_the_training_records(stream):
    from kedit_core.request import load_requests

    reqs, info = stream.stream_requests(6, 0)
    cf = load_requests("counterfact-train", limit=3)
    assert [r.prompt for r in reqs[1::2]] == [r.prompt for r in cf]
    assert info["sources"] == {"zsre-train": 3, "counterfact-train": 3}
    assert info["skipped_records"]["zsre-train"] == [534, 723]  # empty targets
    assert all(r.rephrase_prompts and r.locality for r in reqs)
    assert stream.stream_requests(2, 4)[0] == reqs[4:6]
    with pytest.raises(SystemExit, match="holds"):
        stream.stream_requests(100, 20000)


def test_stream_of_rome_and_grace_on_the_tiny_model(stream, registry, tmp_path):
    out = tmp_path / "s.json"
    args = ["--methods", "rome,grace", "--n", "12", "--every", "4", "--sample", "4", "--probe-n", "30"]
    report = stream.main([*args, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert report["stream"]["sources"] == {"zsre-train": 6, "counterfact-train": 6}
    assert report["probes"]["n"] == 30
    for name in ("rome", "grace"):
        run = report["methods"][name]
        assert [p["edits"] for p in run["checkpoints"]] == [4, 8, 12]
        assert all(p["sample"] == 4 for p in run["checkpoints"])
        for p in run["checkpoints"]:
            for key in ("reliability", "generalization", "locality", "gen_reliability", "gen_locality"):
                assert 0.0 <= p["metrics"][key] <= 1.0
        assert run["final"] == run["checkpoints"][-1]["metrics"]
        assert math.isfinite(run["perplexity_before"]) and math.isfinite(run["perplexity_after"])
        assert run["perplexity_ratio"] == pytest.approx(run["perplexity_after"] / run["perplexity_before"])
        assert 0.0 <= run["unchanged_share"] <= 1.0
        assert run["time_per_edit_s"] > 0 and run["peak_rss_mb"] > 0
        assert "perplexity" not in run["checkpoints"][0]  # drift is measured at the end only by default
    # measured on the edited model, before the editor restores it
    assert report["methods"]["rome"]["perplexity_after"] != report["methods"]["rome"]["perplexity_before"]
    assert report["unedited"]["metrics"]["locality"] == 1.0  # the unedited model is its own reference


def test_a_stream_of_no_edits_measures_the_unedited_model(stream, registry, tmp_path):
    args = ["--methods", "grace", "--n", "0", "--probe-n", "30", "--no-generation", "--drift-every-checkpoint"]
    report = stream.main([*args, "--out", str(tmp_path / "none.json")])
    run = report["methods"]["grace"]
    assert [(p["edits"], p["sample"]) for p in run["checkpoints"]] == [(0, 0)]
    assert run["perplexity_after"] == run["perplexity_before"] == report["unedited"]["perplexity"]
    assert run["unchanged_share"] == 1.0


def test_share_is_the_fraction_of_energy_in_the_basis(null_space):
    basis = torch.eye(3, dtype=torch.float64)[:, :1]  # the first axis
    keys = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert null_space.share(keys, basis) == pytest.approx((9 / 25 + 0.0) / 2)
    assert null_space.share(keys, basis[:, :0]) == 0.0


def test_tiny_run_reports_fractions_per_threshold(null_space, registry, tmp_path):
    out = tmp_path / "share.json"
    report = null_space.main(["--model", "tiny", "--n", "6", "--thresholds", "1000,0.001,0.0", "--out", str(out)])
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


def test_runs_of_one_stream_in_separate_processes_merge_into_one_report(stream, registry, tmp_path):
    common = ["--n", "4", "--every", "2", "--sample", "2", "--probe-n", "10", "--no-generation"]
    runs = {}
    for name in ("rome", "grace"):
        runs[name] = stream.main(["--methods", name, *common, "--out", str(tmp_path / f"{name}.json")])
    merged = stream.main(
        ["--merge", str(tmp_path / "rome.json"), str(tmp_path / "grace.json"), "--out", str(tmp_path / "m.json")]
    )
    assert list(merged["methods"]) == ["rome", "grace"]
    for name, run in runs.items():
        assert merged["methods"][name] == json.loads(json.dumps(run["methods"][name]))
    assert merged["unedited"] == json.loads(json.dumps(runs["rome"]["unedited"]))
    assert merged["merged_from"] == ["rome.json", "grace.json"]
    assert (tmp_path / "m.png").stat().st_size > 10_000
    # another stream (a different start) or the same method twice: refused, nothing written
    other = stream.main(["--methods", "grace", *common, "--start", "2", "--out", str(tmp_path / "other.json")])
    assert other["stream"]["start"] == 2
    with pytest.raises(SystemExit, match="differs in .*stream"):
        stream.main(
            ["--merge", str(tmp_path / "rome.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")]
        )
    with pytest.raises(SystemExit, match="'rome' is in two"):
        stream.main(
            ["--merge", str(tmp_path / "rome.json"), str(tmp_path / "rome.json"), "--out", str(tmp_path / "x.json")]
        )
    assert not (tmp_path / "x.json").exists()
