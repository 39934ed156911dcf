"""Bench jobs as Ray tasks: ``kedit bench --ray auto|ADDRESS|local``.

Each job is one task that declares what it needs -- CPUs (the job's ``threads``, else 1), a GPU when
its device is CUDA, memory (the configuration's ``memory_mb``, else an estimate from earlier results of
the same method, kind and model) -- and runs the job in a child process of its worker, as the local
pool does, so that its peak memory is its own. The task returns the job's result and log; this process
stores them under ``OUT/jobs`` as a local run does, so the cache is the same whichever ran a job.

The workers need kedit-core and the methods' packages installed, and the model and data files (unless
shipped data sets or built-in models) at the same paths. Ray is imported only here, when it is used.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KeditError
from ..fsutil import atomic_write_text
from .jobs import JobSpec
from .runner import ChildRun, Finish, Notify, PlannedJob, read_result, run_child, store_result

log = logging.getLogger(__name__)

INSTALL_HINT = "kedit bench --ray needs Ray: pip install 'kedit-core[ray]'"
#: the memory reserved for a job over the largest peak RSS measured for its kind before
MEMORY_MARGIN = 1.25


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KeditError(INSTALL_HINT) from None
    return ray


def job_task(spec: dict[str, Any]) -> dict[str, Any]:
    """The body of a job's Ray task: the job in a child process, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="kedit-bench-") as tmp:
        run = run_child(JobSpec.from_dict(spec), Path(tmp), "job")
        return {
            "result": run.result,
            "returncode": run.returncode,
            "log": run.log.read_text(errors="replace"),
            "started": run.started,
            "finished": run.finished,
        }


def resources(job: PlannedJob, job_dir: Path) -> dict[str, Any]:
    """The task's needs, as ``ray.remote`` options."""
    needs: dict[str, Any] = {
        "num_cpus": job.spec.threads or 1,
        "num_gpus": 1 if job.spec.device.startswith("cuda") else 0,
    }
    memory_mb = job.memory_mb or memory_estimate_mb(job, job_dir)
    if memory_mb:
        needs["memory"] = memory_mb * 2**20
    return needs


def memory_estimate_mb(job: PlannedJob, job_dir: Path) -> int | None:
    """``MEMORY_MARGIN`` times the largest peak RSS of the stored results of the same method and kind
    on the same model (any variant, any source); None when there is none."""
    peaks = []
    for path in job_dir.glob(f"{job.spec.method}-{job.spec.kind}-*.json"):
        result = read_result(path) if not path.name.endswith(".spec.json") else None
        if result and result.get("spec", {}).get("model") == job.spec.model and result.get("peak_rss_mb"):
            peaks.append(result["peak_rss_mb"])
    return math.ceil(MEMORY_MARGIN * max(peaks)) if peaks else None


@dataclass
class RayExecutor:
    """Jobs as Ray tasks. ``address``: ``auto``, ``ray://host:port``, ``local``... as ``ray.init`` takes
    it; None uses the Ray this process is connected to (or ``ray.init``'s default: ``RAY_ADDRESS``, else
    a new local one). A connection made here is closed when the jobs are done."""

    address: str | None = None
    name: str | None = "Ray"

    def run(self, jobs: list[PlannedJob], job_dir: Path, start: Notify, finish: Finish) -> None:
        ray = import_ray()
        connected_here = not ray.is_initialized()
        if connected_here:
            ray.init(address=self.address, logging_level=logging.WARNING)
        task = ray.remote(max_retries=0)(job_task)  # a failed job is a result, not retried
        pending: dict[Any, PlannedJob] = {}
        try:
            for job in jobs:
                options = {**resources(job, job_dir), "name": job.label}
                pending[task.options(**options).remote(job.spec.to_dict())] = job
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                finish(job, _collect(ray, done[0], job, job_dir))
        finally:
            for ref in pending:  # interrupted: the job processes are ended with their tasks
                ray.cancel(ref)
            if connected_here:
                ray.shutdown()


def _collect(ray: Any, ref: Any, job: PlannedJob, job_dir: Path) -> dict[str, Any]:
    """The finished task's result, stored as a local run's (an ``error`` if the task itself failed)."""
    try:
        out = ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker died (out of memory...) or kedit is missing there
        lines = str(exc).strip().splitlines() or [""]
        line = lines[-1] if isinstance(exc, ray.exceptions.RayTaskError) else lines[0]  # the exception
        log.warning("%s failed on Ray: %s", job.label, line)
        return {"spec": job.spec.to_dict(), "error": f"Ray: {type(exc).__name__}: {line}"}
    log_path = job_dir / f"{job.key}.log"
    atomic_write_text(log_path, out["log"])
    run = ChildRun(out["result"], out["returncode"], log_path, out["started"], out["finished"])
    return store_result(job, job_dir / f"{job.key}.json", run)
