"""``kedit bench`` sweeps (methods x models x hyperparameter values, each a job with its own key and a
row named after its variant) and the Ray executor (the same job results and bench document as the
local pool's, jobs as tasks of a Ray started by the test)."""

import json
import sys

import pytest

from kedit_core.bench import runner
from kedit_core.bench.config import BenchConfig
from kedit_core.bench.jobs import job_hparams
from kedit_core.bench.report import build_document, render_markdown
from kedit_core.cli import main
from kedit_core.errors import KeditError
from kedit_core.testing import tiny_model

FT_HP = {"layers": [1], "lr": 0.05, "num_steps": 8}
#: what may differ between two runs of the same job: timings, memory, the machine's load
TIMING = {
    "edit_seconds",
    "edit_s_total",
    "s_per_edit_median",
    "peak_rss_mb",
    "peak_cuda_mb",
    "rss_mb_curve",
    "load_s",
    "wall_s",
    "load_avg",
    "started_at",
    "finished_at",
    "job_wall_s",
    "s_10_edits",
    "s_10_edits_batch",
    "peak_vram_mb",
    "s_per_edit",
}


@pytest.fixture(scope="module")
def data(shipped_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-data")
    for name, n in (("zsre.json", 2), ("counterfact.json", 2)):
        (d / name).write_text(json.dumps(json.loads((shipped_data / name).read_text())[:n]))
    return d


def sweep_config(data, **kw) -> BenchConfig:
    base = {
        "zsre": str(data / "zsre.json"),
        "counterfact": str(data / "counterfact.json"),
        "zsre_n": 2,
        "counterfact_n": 1,
        "generation": False,
        "methods": ["ft-l", "ft-m"],
        "models": ["tiny-a", "tiny-b"],
        "options": {m: {"hparams": FT_HP, "skip": ["batch", "sequential"]} for m in ("ft-l", "ft-m")},
        "sweep": {"ft-l": {"lr": [0.05, 0.1], "num_steps": [4]}},
    }
    return BenchConfig.model_validate({**base, **kw})


def test_sweep_plans_a_job_per_method_model_variant_and_kind(ft_plugin, data):
    jobs = runner.plan(sweep_config(data), ft_plugin)
    names = list(dict.fromkeys(j.name for j in jobs))
    assert names == [
        "ft-l[lr=0.05, num_steps=4] @ tiny-a",
        "ft-l[lr=0.1, num_steps=4] @ tiny-a",
        "ft-l[lr=0.05, num_steps=4] @ tiny-b",
        "ft-l[lr=0.1, num_steps=4] @ tiny-b",
        "ft-m @ tiny-a",
        "ft-m @ tiny-b",
    ]
    assert len(jobs) == 2 * len(names) and len({j.key for j in jobs}) == len(jobs)  # a cache key each
    first = jobs[0].spec
    assert (first.model, first.overrides, first.hparams) == ("tiny-a", {"lr": 0.05, "num_steps": 4}, FT_HP)
    assert jobs[0].label == "ft-l[lr=0.05, num_steps=4] @ tiny-a counterfact (n=1)"
    # without a sweep or several models nothing is named differently and the keys are the plain ones
    plain = runner.plan(sweep_config(data, models=[], sweep={}, model="tiny-a"), ft_plugin)
    assert {j.name for j in plain} == {"ft-l", "ft-m"} and not any(j.variant for j in plain)
    ft_m = [j for j in jobs if j.name == "ft-m @ tiny-a"]
    assert [j.key for j in ft_m] == [j.key for j in plain if j.name == "ft-m"]
    # the variant's values replace those of the hyperparameters it starts from
    hp = job_hparams(first, "")
    assert (hp.lr, hp.num_steps, hp.layers) == (0.05, 4, [1])


def test_sweep_errors_are_found_before_anything_runs(ft_plugin, data, tmp_path):
    with pytest.raises(KeditError, match=r"sweep of 'ft-l' on tiny-a: .*lrr"):
        runner.plan(sweep_config(data, sweep={"ft-l": {"lrr": [1.0]}}), ft_plugin)
    with pytest.raises(KeditError, match="sweep of 'ft-l'.*lr"):
        runner.plan(sweep_config(data, sweep={"ft-l": {"lr": [-1.0]}}), ft_plugin)
    with pytest.raises(KeditError, match="unknown method 'nope'"):
        runner.plan(sweep_config(data, sweep={"nope": {"lr": [1.0]}}), ft_plugin)
    bad = tmp_path / "sweep.yaml"
    bad.write_text("sweep:\n  ft-l:\n    lr: []\n")
    with pytest.raises(KeditError, match="at least one value"):
        BenchConfig.load(bad)


def test_sweep_report_names_each_variant(ft_plugin, data, tmp_path):
    """One variant really run (its override reaches the job), the rest listed as not run."""
    cfg = sweep_config(data, models=[], model="tiny", counterfact_n=1)
    jobs = [j for j in runner.plan(cfg, ft_plugin) if j.spec.kind == "counterfact"]
    model, tok = tiny_model("llama")
    results = runner.run_jobs(jobs[:1], tmp_path, isolate=False, model=model, tokenizer=tok, progress=False)
    results.update(runner.run_jobs(jobs[1:], tmp_path, progress=False, run_missing=False))
    assert results[jobs[0].key]["hparams"]["lr"] == 0.05 and results[jobs[0].key]["hparams"]["num_steps"] == 4
    doc = build_document(cfg, jobs, results, ft_plugin, "kedit bench")
    assert [r["method"] for r in doc["table1"]] == ["ft-l[lr=0.05, num_steps=4]", "ft-l[lr=0.1, num_steps=4]", "ft-m"]
    assert [r["method"] for r in doc["counterfact"]] == ["ft-l[lr=0.05, num_steps=4]"]
    assert doc["variants"]["ft-l[lr=0.1, num_steps=4]"] == {
        "method": "ft-l",
        "model": "tiny",
        "hparams": {"lr": 0.1, "num_steps": 4},
    }
    assert doc["not_run"] == ["ft-l[lr=0.1, num_steps=4] counterfact", "ft-m counterfact"]
    assert "| ft-l[lr=0.05, num_steps=4] | 1 |" in render_markdown(doc)
    two = sweep_config(data, sweep={})
    doc = build_document(two, runner.plan(two, ft_plugin), {}, ft_plugin, "kedit bench")
    assert doc["model"] == ["tiny-a", "tiny-b"] and set(doc["unedited_by_model"]) == {"tiny-a", "tiny-b"}
    assert "model tiny-a, tiny-b" in render_markdown(doc) and "| unedited @ tiny-b |" in render_markdown(doc)


def test_ray_without_ray_installed_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["bench", "--ray", "auto", "--out", "never"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "kedit: error: kedit bench --ray needs Ray: pip install 'kedit-core[ray]'"


def _bench_files(out):
    jobs = {p.name: json.loads(p.read_text()) for p in (out / "jobs").glob("*.json") if ".spec." not in p.name}
    return jobs, json.loads((out / "bench.json").read_text())


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _structure(value):
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_structure(v) for v in value[:1]]
    return type(value).__name__ if value is not None else None


def test_ray_executor_gives_the_local_pools_results(data, tmp_path, monkeypatch):
    """Two jobs on a tiny model, in the local pool and as tasks of a local Ray: the same job results
    (metrics, patch ids, hyperparameters; timings aside) and the same bench document."""
    ray = pytest.importorskip("ray")
    model, tok = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = tmp_path / "bench.yaml"
    settings = json.loads(sweep_config(data, models=[], sweep={}, model=str(model_dir)).model_dump_json())
    cfg.write_text(json.dumps({**settings, "methods": ["ft-l"], "threads": 1, "workers": 2, "memory_mb": 500}))
    monkeypatch.delenv("KEDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # the job processes find kedit-ft
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bench = ["bench", "--config", str(cfg), "--out"]
    assert main([*bench, str(tmp_path / "local")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="WARNING")
    try:
        assert main([*bench, str(tmp_path / "ray"), "--ray", "local"]) == 0  # the Ray connected to above
    finally:
        ray.shutdown()
    local_jobs, local_doc = _bench_files(tmp_path / "local")
    ray_jobs, ray_doc = _bench_files(tmp_path / "ray")
    assert len(local_jobs) == 2 and set(ray_jobs) == set(local_jobs)
    for name, result in local_jobs.items():
        assert result["patch_ids"] and "error" not in result
        assert _without_timing(ray_jobs[name]) == _without_timing(result)
    assert (tmp_path / "ray" / "jobs" / f"{name[: -len('.json')]}.log").is_file()
    assert ray_doc["jobs"].pop("executor") == "Ray"
    assert _structure(ray_doc) == _structure(local_doc)
    for table in ("table1", "table2", "counterfact", "unedited"):
        assert _without_timing(ray_doc[table]) == _without_timing(local_doc[table])
    assert ray_doc["jobs"]["failed"] == 0 and ray_doc["jobs"]["cached"] == 0


def test_cached_jobs_never_reach_the_executor(ft_plugin, data, tmp_path):
    cfg = sweep_config(data, models=[], sweep={}, methods=["ft-l"])
    jobs = runner.plan(cfg, ft_plugin)
    stored = {"spec": jobs[0].spec.to_dict(), "metrics": {}, "sources": dict(jobs[0].sources)}
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / f"{jobs[0].key}.json").write_text(json.dumps(stored))

    class Recording:
        name = "test"
        ran: list = []

        def run(self, todo, job_dir, start, finish):
            for job in todo:
                self.ran.append(job.key)
                finish(job, {"spec": job.spec.to_dict(), "error": "x"})

    results = runner.run_jobs(jobs, tmp_path, executor=Recording(), progress=False)
    assert Recording.ran == [j.key for j in jobs[1:]] and results[jobs[0].key]["cached"]
