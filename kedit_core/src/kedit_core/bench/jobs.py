"""One bench measurement, run in a child process: ``python -m kedit_core.bench.jobs SPEC.json OUT.json``.

A job loads the model, edits ``n`` records of one data file with one method in one mode and writes a
JSON result: the metrics (before and after), the edit times, peak RSS (and peak CUDA memory) of the
process, and what identifies the run (model fingerprint, method package and version, hyperparameters).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: beside the job results: the unedited model's scores, shared by the jobs on the same records
BASELINE_DIR = "baselines"


@dataclass(frozen=True)
class JobSpec:
    kind: str  # counterfact | batch | zsre | sequential
    method: str
    model: str
    data: str
    n: int
    start: int = 0
    batch_size: int = 1
    sequential: bool = False
    #: the generation protocol (generation-scored metrics, fluency, degeneracy) besides teacher forcing
    generation: bool = False
    hparams: Any = None
    checkpoint: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: hyperparameters changed on top of ``hparams`` (or the model's preset): a sweep's variant
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


def run_job(spec: JobSpec, model: Any = None, tokenizer: Any = None, baseline_dir: Any = None) -> dict[str, Any]:
    """Run ``spec`` in this process and return its result (see the module docstring).

    ``model``/``tokenizer``: an already loaded model to use instead of loading ``spec.model``.
    ``baseline_dir``: where the unedited model's scores are shared between jobs on the same data
    (``Editor.edit``'s ``baseline_dir``).
    """
    import torch

    from ..editor import Editor
    from ..models import model_key
    from ..plugins import get_registry
    from ..request import load_requests

    if spec.threads:
        torch.set_num_threads(spec.threads)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    hparams = job_hparams(spec, "" if model is not None else model_key(spec.model))
    if model is not None:
        editor = Editor(spec.method, model, tokenizer, hparams=hparams, checkpoint=spec.checkpoint)
    else:  # a child process: its progress bar goes to the job's log
        editor = Editor(
            spec.method,
            spec.model,
            hparams=hparams,
            checkpoint=spec.checkpoint,
            device=spec.device,
            dtype=spec.dtype,
            progress=True,
        )
    load_s = time.perf_counter() - t0
    requests = load_requests(spec.data, limit=spec.start + spec.n)[spec.start :]
    result = editor.edit(
        requests,
        sequential=spec.sequential,
        batch_size=spec.batch_size,
        generation=spec.generation,
        baseline_dir=baseline_dir,
    )
    report = result.to_report()
    info = get_registry().methods[editor.method.name].plugin
    per_edit = [s / spec.batch_size for s in result.edit_seconds]
    out: dict[str, Any] = {
        "spec": spec.to_dict(),
        "n": len(requests),
        "method_package": info.package,
        "method_version": info.version,
        "model_id": editor.model_info.id,
        "model_fingerprint": editor._ctx.model_fingerprint,
        "hparams": editor.hparams.to_dict(),
        "metrics": report["metrics"],
        "metrics_pre": report["metrics_pre"],
        "edit_seconds": result.edit_seconds,
        "edit_s_total": sum(result.edit_seconds),
        "s_per_edit_median": statistics.median(per_edit) if per_edit else None,
        "patch_bytes_mean": statistics.mean(p.nbytes() for p in result.patches) if result.patches else None,
        "patch_ids": [p.patch_id for p in result.patches],
        "peak_rss_mb": result.peak_rss_mb,
        "peak_cuda_mb": result.peak_cuda_mb,
        "load_s": load_s,
        "wall_s": time.perf_counter() - t0,
        #: 1-minute load average at the start and end: above the core count, timings are inflated
        "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "threads": torch.get_num_threads(),
        "device": str(next(editor.model.parameters()).device),
    }
    if spec.sequential:
        out["metrics_after_each"] = report.get("metrics_after_each", {})
        out["per_request"] = [{k: r[k] for k in ("post", "final") if k in r} for r in report["per_request"]]
        out["rss_mb_curve"] = report.get("rss_mb_curve", [])
    return out


def job_hparams(spec: JobSpec, key: str) -> Any:
    """What the job passes to the Editor as hyperparameters: ``spec.hparams`` as given, or, for a
    sweep's variant, those (or the preset for the model key ``key``) with the variant's ``overrides``."""
    if not spec.overrides:
        return spec.hparams
    from ..plugins import get_registry

    method = get_registry().method(spec.method)
    return method.load_hparams(spec.hparams, key).updated(**spec.overrides)


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = JobSpec.from_dict(json.loads(Path(spec_path).read_text()))
    from ..fsutil import atomic_write_text

    try:
        result = run_job(spec, baseline_dir=Path(out_path).parent / BASELINE_DIR)
    except Exception as exc:  # reported in the bench tables, the other jobs go on
        result = {"spec": spec.to_dict(), "error": f"{type(exc).__name__}: {exc}"}
        atomic_write_text(Path(out_path), json.dumps(result, indent=1))
        raise
    atomic_write_text(Path(out_path), json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
