"""Plan the bench jobs from the methods' capability flags, run them, cache their results.

Every job's result is stored as ``<out>/jobs/<key>.json``; the key hashes the job's inputs -- the job
spec, the data file's bytes, the hyperparameter file and checkpoint -- and the result records the
source hashes of the method's package and of kedit-core. A rerun after an interruption reuses every
result whose inputs and sources match and runs the rest; after changing one method only its jobs run
again. ``reuse_stale=True`` also reuses results computed with other sources (they are marked stale in
the tables); ``run_missing=False`` runs nothing and reports jobs without a result as not run.
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
from typing import Any

from tqdm.auto import tqdm

from ..datasets import resolve_data
from ..errors import KeditError
from ..fsutil import atomic_write_text
from .config import JOB_KINDS, BenchConfig
from .jobs import JobSpec, run_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedJob:
    key: str
    spec: JobSpec
    #: source hashes of the method's package and of kedit-core when the job was planned
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.spec.method} {self.spec.kind} (n={self.spec.n})"


def plan(config: BenchConfig, registry: Any) -> list[PlannedJob]:
    """The jobs for ``config``: per method, the kinds its capability flags allow."""
    names = config.methods or sorted(registry.methods)
    jobs = []
    for name in names:
        method = registry.method(name)  # KeditError for an unknown name
        opt = config.option(name)
        bad = set(opt.skip) - set(JOB_KINDS)
        if bad:
            raise KeditError(
                f"bench options for {name!r}: unknown job kinds {sorted(bad)} (known: {', '.join(JOB_KINDS)})"
            )

        def cap(n: int, limit: int | None = opt.max_records) -> int:
            return min(n, limit) if limit else n

        common = {
            "method": name,
            "model": config.model,
            "hparams": opt.hparams,
            "checkpoint": opt.checkpoint,
            "device": config.device,
            "dtype": config.dtype,
            "threads": config.threads,
        }
        wanted = {
            "counterfact": JobSpec("counterfact", data=config.counterfact, n=cap(config.counterfact_n), **common),
            "zsre": JobSpec(
                "zsre",
                data=config.zsre,
                n=cap(config.zsre_n),
                start=config.zsre_start,
                fluency=config.fluency,
                **common,
            ),
        }
        if method.supports_batch:
            n = cap(config.speed_n)
            wanted["batch"] = JobSpec("batch", data=config.counterfact, n=n, batch_size=n, **common)
        if method.supports_sequential:
            wanted["sequential"] = JobSpec(
                "sequential",
                data=config.zsre,
                n=cap(config.sequential_n),
                start=config.zsre_start,
                sequential=True,
                **common,
            )
        for kind in JOB_KINDS:
            if kind in wanted and kind not in opt.skip:
                spec = wanted[kind]
                sources = (("method", source_hash(type(method).__module__)), ("core", source_hash(__name__)))
                jobs.append(PlannedJob(job_key(spec), spec, sources))
    return jobs


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
    parts = {
        "spec": spec.to_dict(),
        "data": file_hash(spec.data),
        "hparams": file_hash(spec.hparams) if isinstance(spec.hparams, str) else None,
        "checkpoint": file_hash(spec.checkpoint) if spec.checkpoint else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{spec.method}-{spec.kind}-{digest}"


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
    on_result: Callable[[PlannedJob, dict], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every job; returns ``{key: result}`` in the jobs' order. A failed job's result
    has an ``error``. ``workers`` > 1 runs that many job processes at once (isolated jobs only)."""
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
    bar = tqdm(total=len(todo), desc="bench", unit="job", disable=not progress or not todo)

    def finish(job: PlannedJob, result: dict[str, Any]) -> None:
        results[job.key] = result
        bar.update(1)
        if on_result is not None:
            on_result(job, result)

    try:
        if workers > 1 and isolate and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread waits on one job process
                futures = {
                    pool.submit(_run_one, job, job_dir / f"{job.key}.json", True, None, None): job for job in todo
                }
                for future in as_completed(futures):
                    finish(futures[future], future.result())
        else:
            for job in todo:
                bar.set_postfix_str(job.label)
                finish(job, _run_one(job, job_dir / f"{job.key}.json", isolate, model, tokenizer))
    finally:
        bar.close()
    return {job.key: results[job.key] for job in jobs if job.key in results}


def _cached(job: PlannedJob, path: Path, force: bool, reuse_stale: bool) -> dict[str, Any] | None:
    """The stored result of ``job`` if it can stand for a run now (same inputs, same sources unless
    ``reuse_stale``), marked ``cached`` (and ``stale``)."""
    cached = _read(path) if not force else None
    if cached is None or "error" in cached:
        return None
    stale = cached.get("sources") != dict(job.sources)
    if stale and not reuse_stale:
        return None
    cached["cached"] = True
    cached["stale"] = stale
    return cached


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_one(job: PlannedJob, path: Path, isolate: bool, model: Any, tokenizer: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = time.time()
    if not isolate:
        try:
            result = run_job(job.spec, model, tokenizer)
        except Exception as exc:  # one method failing must not stop the bench
            log.exception("%s failed", job.label)
            result = {"spec": job.spec.to_dict(), "error": f"{type(exc).__name__}: {exc}"}
        if "error" not in result:
            result["sources"] = dict(job.sources)
            result["started_at"], result["finished_at"] = started, time.time()
            atomic_write_text(path, json.dumps(result, indent=1))
        return result
    spec_path = path.with_suffix(".spec.json")
    atomic_write_text(spec_path, json.dumps(job.spec.to_dict()))
    path.unlink(missing_ok=True)
    with open(path.with_suffix(".log"), "w") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "kedit_core.bench.jobs", str(spec_path), str(path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    result = _read(path)
    if result is not None and proc.returncode == 0:
        result["sources"] = dict(job.sources)
        result["started_at"], result["finished_at"] = started, time.time()
        atomic_write_text(path, json.dumps(result, indent=1))
    if result is None or proc.returncode != 0:
        tail = path.with_suffix(".log").read_text().strip().splitlines()[-1:] or ["no output"]
        result = {"spec": job.spec.to_dict(), "error": (result or {}).get("error") or tail[0]}
        path.unlink(missing_ok=True)
    result["job_wall_s"] = time.perf_counter() - t0
    if "error" in result:
        log.warning("%s failed: %s", job.label, result["error"])
    return result
