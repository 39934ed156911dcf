"""``kedit bench`` on a tiny model: jobs planned from capability flags, cached by their inputs, the
tables and figure written, the README section filled from the JSON, and ``--compare``."""

import json

import pytest

from kedit_core.bench import runner
from kedit_core.bench.compare import compare, load_document
from kedit_core.bench.config import BenchConfig
from kedit_core.bench.report import build_document, readme_section, render_markdown, update_readme, write_figure
from kedit_core.cli import main
from kedit_core.errors import KeditError
from kedit_core.testing import tiny_model

FT_HP = {"layers": [1], "lr": 0.05, "num_steps": 8}


@pytest.fixture(scope="module")
def data(shipped_data, tmp_path_factory):
    """The first records of the real ZsRE and CounterFact files."""
    d = tmp_path_factory.mktemp("bench-data")
    for name, n in (("zsre.json", 4), ("counterfact.json", 3)):
        records = json.loads((shipped_data / name).read_text())[:n]
        (d / name).write_text(json.dumps(records))
    return d


def config(data, **kw) -> BenchConfig:
    base = {
        "zsre": str(data / "zsre.json"),
        "counterfact": str(data / "counterfact.json"),
        "zsre_n": 3,
        "counterfact_n": 2,
        "speed_n": 2,
        "sequential_n": 3,
        "generation": True,
        "methods": ["ft-l", "ft-m"],
        "options": {
            "ft-l": {"hparams": FT_HP},
            "ft-m": {"hparams": FT_HP, "max_records": 2, "skip": ["batch"], "note": "capped for the test"},
        },
    }
    return BenchConfig.model_validate({**base, **kw})


def test_plan_follows_capability_flags_and_options(ft_plugin, data):
    jobs = runner.plan(config(data), ft_plugin)
    kinds = {(j.spec.method, j.spec.kind): j.spec for j in jobs}
    # FT supports batch and sequential editing: all four kinds, except what the options skip
    assert set(kinds) == {
        ("ft-l", "counterfact"),
        ("ft-l", "batch"),
        ("ft-l", "zsre"),
        ("ft-l", "sequential"),
        ("ft-m", "counterfact"),
        ("ft-m", "zsre"),
        ("ft-m", "sequential"),
    }
    assert kinds[("ft-l", "batch")].batch_size == 2 and kinds[("ft-l", "sequential")].sequential
    assert kinds[("ft-m", "zsre")].n == 2 and kinds[("ft-l", "zsre")].n == 3  # max_records caps
    assert kinds[("ft-l", "zsre")].generation and kinds[("ft-l", "counterfact")].generation
    assert not kinds[("ft-l", "batch")].generation  # the timing-only job never generates
    with pytest.raises(KeditError, match="unknown method 'nope'"):
        runner.plan(config(data, methods=["nope"]), ft_plugin)
    with pytest.raises(KeditError, match="unknown job kinds"):
        runner.plan(config(data, options={"ft-l": {"skip": ["zrse"]}}), ft_plugin)


def test_job_key_depends_on_the_data_bytes(ft_plugin, data, tmp_path):
    spec = runner.plan(config(data), ft_plugin)[0].spec
    key = runner.job_key(spec)
    assert runner.job_key(spec) == key
    changed = tmp_path / "cf.json"
    changed.write_text((data / "counterfact.json").read_text().replace("a", "b", 1))
    other = type(spec)(**{**spec.to_dict(), "data": str(changed)})
    runner.file_hash.cache_clear()
    assert runner.job_key(other) != key


def test_config_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "bench.yaml"
    bad.write_text("zsre_n: 5\nsequental_n: 3\n")
    with pytest.raises(KeditError, match="unknown field 'sequental_n'"):
        BenchConfig.load(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("zsre: data/z.json\n")
    assert BenchConfig.load(good).zsre == str((tmp_path / "data" / "z.json").resolve())


@pytest.fixture(scope="module")
def bench_run(ft_plugin, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    model, tok = tiny_model("llama")
    cfg = config(data)
    jobs = runner.plan(cfg, ft_plugin)
    results = runner.run_jobs(jobs, out, isolate=False, model=model, tokenizer=tok, progress=False)
    return cfg, jobs, results, out, (model, tok)


def test_bench_tables_come_from_flags_and_jobs(bench_run, ft_plugin):
    cfg, jobs, results, out, _ = bench_run
    assert not [r for r in results.values() if "error" in r]
    doc = build_document(cfg, jobs, results, ft_plugin, "kedit bench --test")
    t1 = {r["method"]: r for r in doc["table1"]}
    caps = ft_plugin.method("ft-l").capabilities()
    assert (t1["ft-l"]["batch"], t1["ft-l"]["sequential"], t1["ft-l"]["training"], t1["ft-l"]["edit_area"]) == (
        caps["batch"],
        caps["sequential"],
        caps["training"],
        caps["edit_area"],
    )
    assert t1["ft-l"]["version"] == "9.9" and t1["ft-l"]["s_10_edits"] > 0 and t1["ft-l"]["s_10_edits_batch"] > 0
    assert t1["ft-m"]["s_10_edits_batch"] is None  # skipped in the options
    t2 = {r["method"]: r for r in doc["table2"]}
    assert t2["ft-m"]["n"] == 2 and t2["ft-l"]["n"] == 3
    for row in doc["table2"]:
        assert 0.0 <= row["reliability"] <= 1.0 and row["fluency"] is not None
    # a real edit on the tiny model: reliability rises above the unedited model's
    assert t2["ft-l"]["reliability"] > doc["unedited"]["zsre"]["reliability"]
    assert {r["method"] for r in doc["sequential"]} == {"ft-l", "ft-m"}
    assert len(doc["sequential"][0]["per_request"]) == 3
    assert doc["data"]["zsre"]["sha256"] and doc["data"]["zsre"]["n"] == 3
    md = render_markdown(doc, "sequential.png")
    assert "| ft-l |" in md and "![metrics" in md and "capped for the test" in md
    png = write_figure(doc, out / "sequential.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_cached_results(bench_run, monkeypatch):
    cfg, jobs, results, out, (model, tok) = bench_run

    def boom(*a, **k):
        raise AssertionError("a cached job ran again")

    monkeypatch.setattr(runner, "run_job", boom)
    again = runner.run_jobs(jobs, out, isolate=False, model=model, tokenizer=tok, progress=False)
    assert all(r.get("cached") for r in again.values())
    assert {k: r["metrics"] for k, r in again.items()} == {k: r["metrics"] for k, r in results.items()}


def test_changed_source_reruns_unless_stale_results_are_accepted(bench_run, ft_plugin, monkeypatch):
    cfg, jobs, results, out, (model, tok) = bench_run
    edited = [runner.PlannedJob(j.key, j.spec, (("method", "edited"), ("core", "x"))) for j in jobs[:1]]
    ran = []
    monkeypatch.setattr(runner, "run_job", lambda spec, *a, **k: ran.append(spec) or {"metrics": {}, "wall_s": 0.0})
    runner.run_jobs(edited, out, isolate=False, model=model, tokenizer=tok, progress=False)
    assert len(ran) == 1  # the method's source changed: its job runs again
    (out / "jobs" / f"{jobs[0].key}.json").write_text(json.dumps(results[jobs[0].key]))
    reused = runner.run_jobs(edited, out, isolate=False, model=model, tokenizer=tok, progress=False, reuse_stale=True)
    assert len(ran) == 1 and reused[jobs[0].key]["stale"] is True
    missing = [runner.PlannedJob("never-run-key", jobs[0].spec, jobs[0].sources)]
    got = runner.run_jobs(missing, out, isolate=False, progress=False, run_missing=False)
    assert got["never-run-key"]["not_run"] and len(ran) == 1
    doc = build_document(cfg, missing, got, ft_plugin, "kedit bench --cached-only")
    assert doc["not_run"] == ["ft-l counterfact"] and doc["jobs"]["failed"] == 0 and doc["errors"] == {}
    assert "not run yet" in render_markdown(doc)


def test_readme_section_is_the_rendered_json(bench_run, ft_plugin, tmp_path):
    cfg, jobs, results, _, _ = bench_run
    doc = build_document(cfg, jobs, results, ft_plugin, "kedit bench")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n<!-- kedit-bench:begin -->\nold\n<!-- kedit-bench:end -->\n\nafter\n")
    update_readme(readme, render_markdown(doc))
    assert readme_section(readme) == render_markdown(json.loads(json.dumps(doc)))
    assert readme.read_text().startswith("# x\n\nintro\n") and readme.read_text().endswith("\n\nafter\n")
    with pytest.raises(KeditError, match="no '<!-- kedit-bench:begin -->'"):
        update_readme(_plain(tmp_path), "x")


def _plain(tmp_path):
    p = tmp_path / "plain.md"
    p.write_text("# nothing\n")
    return p


def test_compare_reports_changes(bench_run, ft_plugin, tmp_path, capsys):
    cfg, jobs, results, _, _ = bench_run
    old = build_document(cfg, jobs, results, ft_plugin, "kedit bench")
    new = json.loads(json.dumps(old))
    new["table2"][0]["reliability"] = old["table2"][0]["reliability"] - 0.25
    new["model_fingerprint"] = "another"
    diff = compare(old, new)
    assert "model_fingerprint" in diff["identity"]
    changed = [c for c in diff["changes"] if c["table"] == "table2" and c["column"] == "reliability"]
    assert len(changed) == 1 and changed[0]["delta"] == pytest.approx(-0.25)
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "differs: model_fingerprint" in out and "reliability" in out and "-0.250" in out
    assert compare(old, json.loads(json.dumps(old)))["changes"] == []
    (tmp_path / "c.json").write_text('{"x": 1}')
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 1
    assert "not a bench JSON file" in capsys.readouterr().err
    assert load_document(tmp_path / "a.json")["schema"] == 1


def test_cli_bench_runs_jobs_in_child_processes(data, tmp_path, monkeypatch, capsys):
    """The whole command: each job in its own process (plugins found through entry points there)."""
    model, tok = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        json.dumps(
            {
                **json.loads(config(data).model_dump_json()),
                "model": str(model_dir),
                "methods": ["ft-l"],
                "sequential_n": 2,
                "zsre_n": 2,
                "generation": False,
            }
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text("<!-- kedit-bench:begin -->\n<!-- kedit-bench:end -->\n")
    monkeypatch.delenv("KEDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--readme", str(readme), "--workers", "2"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in doc["table1"]] == ["ft-l"] and doc["jobs"]["failed"] == 0
    # two job processes at once: the span from first start to last end is shorter than the jobs' sum
    jobs = [json.loads(p.read_text()) for p in (out / "jobs").glob("*.json") if not p.name.endswith(".spec.json")]
    assert len(jobs) == 4 and doc["jobs"]["workers"] == 2
    assert doc["jobs"]["span_s"] == round(max(j["finished_at"] for j in jobs) - min(j["started_at"] for j in jobs), 1)
    assert doc["jobs"]["span_s"] < sum(j["finished_at"] - j["started_at"] for j in jobs)
    assert doc["table1"][0]["peak_rss_mb"] > 0 and doc["jobs"]["cached"] == 0
    assert (out / "sequential.png").is_file()
    assert readme_section(readme) == render_markdown(doc, "out/sequential.png")
    assert len(list((out / "jobs").glob("*.log"))) == 4
