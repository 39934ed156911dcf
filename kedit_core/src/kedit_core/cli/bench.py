"""``kedit bench``: the paper's Table 1 and Table 2 and a sequential-editing figure on one model."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from .options import echo_json, table


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Bench configuration (YAML/JSON): methods, data files, record counts, per-method options.",
)
@click.option(
    "--methods", default=None, help="Comma-separated methods (default: the configuration's, or all installed)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Directory for bench.json, bench.md, sequential.png and the per-job cache (jobs/).",
)
@click.option("--force", is_flag=True, help="Rerun every job even when a cached result with the same inputs exists.")
@click.option(
    "--reuse-stale",
    is_flag=True,
    help="Reuse cached results computed with an earlier source of the method or kedit-core (marked in the tables).",
)
@click.option(
    "--cached-only", is_flag=True, help="Run nothing: build the tables from cached results (others listed as not run)."
)
@click.option(
    "--readme",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Also write the tables into this README, between the kedit-bench markers.",
)
@click.option(
    "--compare",
    "compare_paths",
    nargs=2,
    type=click.Path(dir_okay=False),
    default=None,
    metavar="OLD.json NEW.json",
    help="Print the differences between two bench runs (runs nothing).",
)
@click.option(
    "--tolerance", type=float, default=0.0, show_default=True, help="With --compare: hide changes up to this size."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Jobs to run at once, each in its own process (default: the configuration's; not with --ray).",
)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="ADDRESS",
    help="Run the jobs as Ray tasks: auto (the running cluster), ray://HOST:PORT, or local (a Ray started "
    "here); each reserves its threads as CPUs, a GPU on cuda, and memory_mb. Needs kedit-core[ray].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench(
    config_path,
    methods,
    out_dir,
    force,
    reuse_stale,
    cached_only,
    readme,
    compare_paths,
    tolerance,
    workers,
    ray_address,
    as_json,
) -> None:
    """Run every installed method (or --methods) on the configured model and data; write the tables.

    Each job runs in its own process (peak memory per method) and is cached under OUT/jobs, keyed by
    its inputs and the source code of the method and of kedit-core: rerunning resumes. A configuration
    with `models:` and `sweep:` runs each method variant (hyperparameter values) on each model.
    """
    if compare_paths:
        _compare(*compare_paths, tolerance=tolerance, as_json=as_json)
        return
    from ..bench.config import BenchConfig
    from ..bench.report import build_document, render_markdown, update_readme, write_figure
    from ..bench.runner import plan, run_jobs
    from ..fsutil import atomic_write_text
    from ..plugins import get_registry

    executor = _ray_executor(ray_address) if ray_address else None
    config = BenchConfig.load(config_path)
    if methods:
        config = config.model_copy(update={"methods": [m.strip() for m in methods.split(",") if m.strip()]})
    if workers:
        config = config.model_copy(update={"workers": workers})
    registry = get_registry()
    jobs = plan(config, registry)
    out = Path(out_dir)

    def report(job, result) -> None:
        if result.get("not_run"):
            status = "not run"
        elif "error" in result:
            status = "failed: " + result["error"]
        else:
            status = (
                ("cached, stale" if result.get("stale") else "cached")
                if result.get("cached")
                else f"{result['wall_s']:.0f} s"
            )
        click.echo(f"  {job.label}: {status}", err=True)

    results = run_jobs(
        jobs,
        out,
        force=force,
        reuse_stale=reuse_stale,
        run_missing=not cached_only,
        workers=config.workers,
        executor=executor,
        on_result=report,
    )
    command = (
        "kedit bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "kedit bench"
    )
    doc = build_document(config, jobs, results, registry, command, executor.name if executor else None)
    figure = write_figure(doc, out / "sequential.png")
    atomic_write_text(out / "bench.json", json.dumps(doc, indent=1))
    markdown = render_markdown(doc, figure.name if figure else None)
    atomic_write_text(out / "bench.md", markdown)
    if readme:
        rel = _relative(figure, Path(readme).parent) if figure else None
        update_readme(Path(readme), render_markdown(doc, rel))
    if as_json:
        echo_json(doc)
    else:
        click.echo(markdown)
        click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {figure}" if figure else ""))
    if doc["jobs"]["failed"]:
        raise SystemExit(1)


def _ray_executor(address: str):
    """The Ray executor; fails in one line, before anything runs, when Ray is not installed."""
    from ..bench.ray_executor import RayExecutor, import_ray

    import_ray()
    return RayExecutor(address)


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), base.resolve())


def _compare(old_path: str, new_path: str, *, tolerance: float, as_json: bool) -> None:
    from ..bench.compare import compare, load_document

    diff = compare(load_document(old_path), load_document(new_path), tolerance=tolerance)
    if as_json:
        echo_json(diff)
        return
    click.echo(f"old: {old_path} ({diff['old_date']})\nnew: {new_path} ({diff['new_date']})")
    for key, v in diff["identity"].items():
        click.echo(
            f"differs: {key}: {json.dumps(v['old'], default=str)[:120]} -> {json.dumps(v['new'], default=str)[:120]}"
        )
    if not diff["changes"]:
        click.echo("no differences in the tables")
        return
    rows = [
        [
            c["table"],
            c["method"],
            c["column"],
            c["old"],
            c["new"],
            c["delta"],
            None if c["relative"] is None else f"{100 * c['relative']:+.1f}%",
        ]
        for c in diff["changes"]
    ]
    click.echo(table(rows, ["table", "method", "column", "old", "new", "delta", "change"]))
