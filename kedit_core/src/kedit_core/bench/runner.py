"""Plan the bench jobs from the methods' capability flags, run them, cache their results.

Every job's result is stored as ``<out>/jobs/<key>.json``; the key hashes the job's inputs -- the job
spec, the data file's bytes, the hyperparameter file and checkpoint -- and the result records the
source hashes of the method's package and of kedit-core. A rerun after an interruption reuses every
result whose inputs and sources match and runs the rest; after changing one method only its jobs run
again. ``reuse_stale=True`` also reuses results computed with other sources (they are marked stale in
the tables); ``run_missing=False`` runs nothing and reports jobs without a result as not run.

The jobs that must run go to an :class:`Executor`: the :class:`LocalExecutor` (this machine, ``workers``
job processes at once) or the :class:`~kedit_core.bench.ray_executor.RayExecutor` (Ray tasks). Either
one stores a result the same way (:func:`store_result`), so the cache does not depend on where a job ran.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..datasets import resolve_data
from ..errors import KeditError
from ..fsutil import atomic_write_text
from ..models import model_key
from .config import JOB_KINDS, BenchConfig
from .jobs import BASELINE_DIR, JobSpec, run_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedJob:
    key: str
    spec: JobSpec
    #: source hashes of the method's package and of kedit-core when the job was planned
    sources: tuple[tuple[str, str], ...] = ()
    #: the row's name in the tables when it is not the method's: a sweep's variant, or the model
    variant: str = ""
    #: memory the job reserves on a Ray cluster, from the configuration (not part of the key)
    memory_mb: int | None = None

    @property
    def name(self) -> str:
        return self.variant or self.spec.method

    @property
    def label(self) -> str:
        return f"{self.name} {self.spec.kind} (n={self.spec.n})"


def variant_name(method: str, overrides: dict[str, Any], model: str | None = None) -> str:
    """``rome``, ``rome[clamp_norm_factor=1.5]``, ``rome[clamp_norm_factor=1.5] @ gpt2``."""
    name = method
    if overrides:
        values = (f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
        name += "[" + ", ".join(values) + "]"
    return f"{name} @ {model}" if model else name


def plan(config: BenchConfig, registry: Any) -> list[PlannedJob]:
    """The jobs for ``config``: per method, model and sweep variant, the kinds its capability flags allow."""
    names = config.methods or sorted(registry.methods)
    for name in config.sweep:
        registry.method(name)  # KeditError for an unknown name
    models = config.model_names()
    jobs = []
    for name in names:
        method = registry.method(name)  # KeditError for an unknown name
        opt = config.option(name)
        bad = set(opt.skip) - set(JOB_KINDS)
        if bad:
            raise KeditError(
                f"bench options for {name!r}: unknown job kinds {sorted(bad)} (known: {', '.join(JOB_KINDS)})"
            )
        for model in models:
            for overrides in config.variants(name):
                if overrides:
                    _check_overrides(name, method, opt.hparams, model, overrides)
                variant = variant_name(name, overrides, model if len(models) > 1 else None)
                jobs += _method_jobs(config, name, method, model, overrides, variant)
    return jobs


def _check_overrides(name: str, method: Any, hparams: Any, model: str, overrides: dict[str, Any]) -> None:
    """Before anything runs: the swept names and values are valid hyperparameters of ``method``."""
    try:
        method.load_hparams(hparams, model_key(model)).updated(**overrides)
    except KeditError as exc:
        raise KeditError(f"sweep of {name!r} on {model}: {exc}") from None


def _method_jobs(
    config: BenchConfig, name: str, method: Any, model: str, overrides: dict[str, Any], variant: str
) -> list[PlannedJob]:
    """The jobs of one method (one variant, on one model), in the order of ``JOB_KINDS``."""
    opt = config.option(name)

    def cap(n: int, limit: int | None = opt.max_records) -> int:
        return min(n, limit) if limit else n

    common = {
        "method": name,
        "model": model,
        "hparams": opt.hparams,
        "checkpoint": opt.checkpoint,
        "device": config.device,
        "dtype": config.dtype,
        "threads": config.threads,
        "overrides": overrides,
    }
    wanted = {
        "counterfact": JobSpec(
            "counterfact", data=config.counterfact, n=cap(config.counterfact_n), generation=config.generation, **common
        ),
        "zsre": JobSpec(
            "zsre",
            data=config.zsre,
            n=cap(config.zsre_n),
            start=config.zsre_start,
            generation=config.generation,
            **common,
        ),
    }
    if method.supports_batch:
        n = cap(config.speed_n)
        wanted["batch"] = JobSpec("batch", data=config.counterfact, n=n, batch_size=n, **common)
    if method.supports_sequential:
        data, start = config.sequential_subset()
        wanted["sequential"] = JobSpec(
            "sequential",
            data=data,
            n=cap(config.sequential_n),
            start=start,
            sequential=True,
            generation=config.generation,
            **common,
        )
    sources = (("method", source_hash(type(method).__module__)), ("core", source_hash(__name__)))
    memory = opt.memory_mb or config.memory_mb
    return [
        PlannedJob(job_key(wanted[kind]), wanted[kind], sources, "" if variant == name else variant, memory)
        for kind in JOB_KINDS
        if kind in wanted and kind not in opt.skip
    ]


def _hash_files(paths: Iterable[Path], root: Path, h: Any) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())


@cache
def source_hash(module: str) -> str:
    """sha256 of the ``.py``/``.yaml``/``.json`` files of the top-level package of ``module``."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return "?"
    root = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256()
    files = [
        p
        for ext in ("*.py", "*.yaml", "*.json")
        for p in root.rglob(ext)
        if "__pycache__" not in p.parts and "cli" not in p.relative_to(root).parts
    ]
    _hash_files(files, root, h)
    return h.hexdigest()


@cache
def file_hash(path: str) -> str:
    p = resolve_data(path)
    if p.is_dir():
        h = hashlib.sha256()
        _hash_files([q for q in p.rglob("*") if q.is_file()], p, h)
        return h.hexdigest()
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return "missing"


def job_key(spec: JobSpec) -> str:
    fields = spec.to_dict()
    if not fields["overrides"]:  # a job that is no sweep's variant keeps the key it had before sweeps
        del fields["overrides"]
    parts = {
        "spec": fields,
        "data": file_hash(spec.data),
        "hparams": file_hash(spec.hparams) if isinstance(spec.hparams, str) else None,
        "checkpoint": file_hash(spec.checkpoint) if spec.checkpoint else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{spec.method}-{spec.kind}-{digest}"


Notify = Callable[[PlannedJob], None]
Finish = Callable[[PlannedJob, dict[str, Any]], None]


class Executor(Protocol):
    """Where the jobs without a cached result run: :class:`LocalExecutor` (this machine) or
    :class:`~kedit_core.bench.ray_executor.RayExecutor` (a Ray cluster)."""

    #: how the bench document names it (None: the local pool, named by its ``workers``)
    name: str | None

    def run(self, jobs: list[PlannedJob], job_dir: Path, start: Notify, finish: Finish) -> None:
        """Run ``jobs``; call ``start(job)`` when one starts (where known) and ``finish(job, result)``
        when it ends, in any order, from this thread. A job that succeeded has its result stored as
        ``job_dir/<key>.json`` (:func:`store_result`) before ``finish``; a failed one has an ``error``."""


@dataclass
class LocalExecutor:
    """Jobs on this machine: one after another, or ``workers`` job processes at once (isolated jobs
    only). ``isolate=False`` runs them in this process, on ``model``/``tokenizer`` if given."""

    workers: int = 1
    isolate: bool = True
    model: Any = None
    tokenizer: Any = None
    name: str | None = None

    def run(self, jobs: list[PlannedJob], job_dir: Path, start: Notify, finish: Finish) -> None:
        if self.workers > 1 and self.isolate and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:  # each thread waits on one job process
                futures = {pool.submit(self._run_one, job, job_dir): job for job in jobs}
                for future in as_completed(futures):
                    finish(futures[future], future.result())
        else:
            for job in jobs:
                start(job)
                finish(job, self._run_one(job, job_dir))

    def _run_one(self, job: PlannedJob, job_dir: Path) -> dict[str, Any]:
        if not self.isolate:
            return _run_in_process(job, job_dir / f"{job.key}.json", self.model, self.tokenizer)
        return store_result(job, job_dir / f"{job.key}.json", run_child(job.spec, job_dir, job.key))


def run_jobs(
    jobs: list[PlannedJob],
    out_dir: Path,
    *,
    force: bool = False,
    isolate: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    reuse_stale: bool = False,
    run_missing: bool = True,
    workers: int = 1,
    executor: Executor | None = None,
    on_result: Finish | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every job; returns ``{key: result}`` in the jobs' order. A failed job's result
    has an ``error``. The jobs run on ``executor``, by default a :class:`LocalExecutor` of ``workers``,
    ``isolate``, ``model`` and ``tokenizer``."""
    job_dir = out_dir / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    todo: list[PlannedJob] = []
    for job in jobs:
        cached = _cached(job, job_dir / f"{job.key}.json", force, reuse_stale)
        if cached is not None:
            results[job.key] = cached
        elif not run_missing:
            results[job.key] = {"spec": job.spec.to_dict(), "error": "not run", "not_run": True}
        else:
            todo.append(job)
            continue
        if on_result is not None:
            on_result(job, results[job.key])
    if executor is None:
        executor = LocalExecutor(workers=workers, isolate=isolate, model=model, tokenizer=tokenizer)
    bar = tqdm(total=len(todo), desc="bench", unit="job", disable=not progress or not todo)

    def finish(job: PlannedJob, result: dict[str, Any]) -> None:
        results[job.key] = result
        bar.update(1)
        if on_result is not None:
            on_result(job, result)

    try:
        if todo:
            executor.run(todo, job_dir, lambda job: bar.set_postfix_str(job.label), finish)
    finally:
        bar.close()
    return {job.key: results[job.key] for job in jobs if job.key in results}


def _cached(job: PlannedJob, path: Path, force: bool, reuse_stale: bool) -> dict[str, Any] | None:
    """The stored result of ``job`` if it can stand for a run now (same inputs, same sources unless
    ``reuse_stale``), marked ``cached`` (and ``stale``)."""
    cached = read_result(path) if not force else None
    if cached is None or "error" in cached:
        return None
    stale = cached.get("sources") != dict(job.sources)
    if stale and not reuse_stale:
        return None
    cached["cached"] = True
    cached["stale"] = stale
    return cached


def read_result(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_in_process(job: PlannedJob, path: Path, model: Any, tokenizer: Any) -> dict[str, Any]:
    started = time.time()
    try:
        result = run_job(job.spec, model, tokenizer, baseline_dir=path.parent / BASELINE_DIR)
    except Exception as exc:  # one method failing must not stop the bench
        log.exception("%s failed", job.label)
        result = {"spec": job.spec.to_dict(), "error": f"{type(exc).__name__}: {exc}"}
    if "error" not in result:
        result["sources"] = dict(job.sources)
        result["started_at"], result["finished_at"] = started, time.time()
        atomic_write_text(path, json.dumps(result, indent=1))
    return result


@dataclass
class ChildRun:
    """What a job process left: its result (None if it wrote none), exit status and log."""

    result: dict[str, Any] | None
    returncode: int
    log: Path
    started: float
    finished: float


def run_child(spec: JobSpec, workdir: Path, stem: str) -> ChildRun:
    """Run ``spec`` in ``python -m kedit_core.bench.jobs``, its own process (so that its peak memory is
    its own): ``workdir/STEM.spec.json`` in, ``STEM.json`` out, its output in ``STEM.log``."""
    spec_path, out_path, log_path = (workdir / f"{stem}{ext}" for ext in (".spec.json", ".json", ".log"))
    atomic_write_text(spec_path, json.dumps(spec.to_dict()))
    out_path.unlink(missing_ok=True)
    started = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "kedit_core.bench.jobs", str(spec_path), str(out_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    return ChildRun(read_result(out_path), proc.returncode, log_path, started, time.time())


def store_result(job: PlannedJob, path: Path, run: ChildRun) -> dict[str, Any]:
    """The job's result from its process: stored as ``path`` (with the sources and when it ran) if it
    succeeded; else an ``error`` from the result or the log's last line, and nothing stored."""
    result = run.result
    if result is not None and run.returncode == 0:
        result["sources"] = dict(job.sources)
        result["started_at"], result["finished_at"] = run.started, run.finished
        atomic_write_text(path, json.dumps(result, indent=1))
    else:
        tail = run.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        result = {"spec": job.spec.to_dict(), "error": (result or {}).get("error") or tail[0]}
        path.unlink(missing_ok=True)
    result["job_wall_s"] = run.finished - run.started
    if "error" in result:
        log.warning("%s failed: %s", job.label, result["error"])
    return result
