"""The bench document (JSON) and its renderings: markdown tables, the sequential figure, the README.

The JSON holds everything a table shows plus what identifies the run (kedit version, model
fingerprint, data subsets, machine), so two runs can be compared (:mod:`.compare`). The markdown is
rendered from the JSON alone: ``render_markdown(json)`` is what the README shows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from ..datasets import resolve_data
from ..evaluate.metrics import metric_names
from .config import BenchConfig
from .runner import PlannedJob

SCHEMA = 1
README_BEGIN = "<!-- kedit-bench:begin -->"
README_END = "<!-- kedit-bench:end -->"


def _data_subset(path: str, start: int, n: int) -> dict[str, Any]:
    p = resolve_data(path)
    sha = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return {"file": p.name, "sha256": sha, "start": start, "n": n}


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
    }


def build_document(
    config: BenchConfig,
    jobs: list[PlannedJob],
    results: dict[str, dict[str, Any]],
    registry: Any,
    command: str,
    executor: str | None = None,
) -> dict[str, Any]:
    """The bench document; a row per method, or per variant (``job.name``) in a sweep. ``executor``
    names where the jobs ran when not in the local pool (``Ray``)."""
    from ..plugins import core_version

    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for job in jobs:
        by_method.setdefault(job.name, {})[job.spec.kind] = results.get(job.key, {"error": "not run"})
    ok = [r for r in results.values() if "error" not in r]
    fingerprints = sorted({r["model_fingerprint"] for r in ok})
    models = config.model_names()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "kedit_version": core_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": _machine(),
        "model": models[0] if len(models) == 1 else models,
        "model_fingerprint": fingerprints[0] if len(fingerprints) == 1 else fingerprints,
        "data": {
            "zsre": _data_subset(config.zsre, config.zsre_start, config.zsre_n),
            "counterfact": _data_subset(config.counterfact, 0, config.counterfact_n),
            "sequential": _data_subset(*config.sequential_subset(), config.sequential_n),
        },
        "load_avg_max": max((max(r.get("load_avg", [0.0])) for r in ok), default=None),
        "jobs": {
            "total": len(jobs),
            "failed": sum(
                "error" in results.get(j.key, {"error": 1}) and not results.get(j.key, {}).get("not_run") for j in jobs
            ),
            "cached": sum(bool(results.get(j.key, {}).get("cached")) for j in jobs),
            "wall_s_sum": round(sum(r.get("wall_s", 0.0) for r in ok), 1),
            "workers": config.workers,
            "span_s": _span(ok),
        },
        "speed_n": config.speed_n,
        "table1": [],
        "table2": [],
        "counterfact": [],
        "sequential": [],
        "notes": {m: o.note for m, o in config.options.items() if o.note and m in {j.spec.method for j in jobs}},
        "errors": {
            f"{m} {k}": r["error"]
            for m, kinds in by_method.items()
            for k, r in kinds.items()
            if "error" in r and not r.get("not_run")
        },
        "not_run": sorted(f"{m} {k}" for m, kinds in by_method.items() for k, r in kinds.items() if r.get("not_run")),
        "stale": sorted(f"{m} {k}" for m, kinds in by_method.items() for k, r in kinds.items() if r.get("stale")),
    }
    if executor:
        doc["jobs"]["executor"] = executor
    variants = {job.name: job for job in jobs if job.variant}
    if variants:
        doc["variants"] = {
            name: {"method": j.spec.method, "model": j.spec.model, "hparams": j.spec.overrides}
            for name, j in variants.items()
        }
    method_of = {job.name: job.spec.method for job in jobs}
    for name, kinds in by_method.items():
        _add_rows(doc, name, kinds, registry, method_of[name])
    doc["unedited"] = _unedited(jobs, results)
    if len(models) > 1:
        doc["unedited_by_model"] = {model: _unedited(jobs, results, model) for model in models}
    return doc


def _unedited(jobs: list[PlannedJob], results: dict[str, dict[str, Any]], model: str | None = None) -> dict[str, Any]:
    """The unedited model's scores: the ``metrics_pre`` of the first ZsRE and CounterFact jobs that
    have them (on ``model`` if given)."""

    def first(kind: str) -> dict[str, Any] | None:
        for job in jobs:
            pre = results.get(job.key, {}).get("metrics_pre")
            if job.spec.kind == kind and pre and model in (None, job.spec.model):
                return {m: pre.get(m) for m in metric_names(kind)}
        return None

    return {"zsre": first("zsre"), "counterfact": first("counterfact")}


def _add_rows(
    doc: dict[str, Any], name: str, kinds: dict[str, dict[str, Any]], registry: Any, method_name: str
) -> None:
    """The rows of one method (or sweep variant) ``name`` in each table, from its jobs' results."""
    method = registry.method(method_name)
    info = registry.methods[method_name].plugin
    caps = method.capabilities()
    cf, batch, zs, seq = (kinds.get(k, {}) for k in ("counterfact", "batch", "zsre", "sequential"))
    ten = 10 * cf["s_per_edit_median"] if cf.get("s_per_edit_median") is not None else None
    ten_batch = batch["edit_s_total"] * 10 / batch["n"] if batch.get("edit_s_total") is not None else None
    peaks = [r["peak_rss_mb"] for r in (cf, batch) if r.get("peak_rss_mb")]
    cuda = [r["peak_cuda_mb"] for r in (cf, batch) if r.get("peak_cuda_mb")]
    doc["table1"].append(
        {
            "method": name,
            "package": info.package,
            "version": info.version,
            "batch": caps["batch"],
            "sequential": caps["sequential"],
            "training": caps["training"],
            "edit_area": caps["edit_area"],
            "s_10_edits": ten,
            "s_10_edits_batch": ten_batch,
            "peak_rss_mb": max(peaks) if peaks else None,
            "peak_vram_mb": max(cuda) if cuda else None,
            "patch_kb": cf["patch_bytes_mean"] / 1024 if cf.get("patch_bytes_mean") is not None else None,
        }
    )
    if zs.get("metrics") is not None:
        doc["table2"].append(
            {
                "method": name,
                "n": zs["n"],
                **{m: zs["metrics"].get(m) for m in metric_names("zsre")},
                "fluency_pre": zs["metrics_pre"].get("fluency"),
                "s_per_edit": statistics.mean(zs["edit_seconds"]) if zs.get("edit_seconds") else None,
            }
        )
    if cf.get("metrics") is not None:
        doc["counterfact"].append(
            {"method": name, "n": cf["n"], **{m: cf["metrics"].get(m) for m in metric_names("counterfact")}}
        )
    if seq.get("metrics") is not None:
        doc["sequential"].append(
            {
                "method": name,
                "n": seq["n"],
                "final": {m: seq["metrics"].get(m) for m in metric_names("sequential")},
                "after_each": {m: seq["metrics_after_each"].get(m) for m in metric_names("sequential")},
                "per_request": seq["per_request"],
            }
        )


# -- rendering ------------------------------------------------------------------------------------
#: short column names: TF = teacher-forced (EasyEdit token accuracy), GEN = generation protocol
COLUMN_LABELS = {
    "reliability": "rel. TF",
    "generalization": "general. TF",
    "locality": "loc. TF",
    "portability": "port. TF",
    "efficacy_score": "ES",
    "paraphrase_score": "PS",
    "neighborhood_score": "NS",
    "gen_reliability": "rel. GEN",
    "gen_generalization": "general. GEN",
    "gen_locality": "loc. GEN",
    "gen_portability": "port. GEN",
    "degenerate": "degenerate",
    "fluency": "fluency",
}

PROTOCOL_LEGEND = (
    "*TF*: teacher-forced token accuracy (EasyEdit's protocol; locality: share of the unedited model's argmax "
    "tokens kept). *GEN*: generation protocol -- greedy decoding from the prompt alone, the answer's leading "
    "phrase equal to the target after normalization, a degenerate request counted as a failure; locality: the "
    "unedited model's greedy answer unchanged. *degenerate*: share of requests whose continuations hold a "
    "special token, a loop the unedited model does not make, or a fluency drop of more than 1 bit. *fluency*: "
    "n-gram entropy of 40-token greedy generations (unedited model in the first row)."
)


def column_label(metric: str) -> str:
    return COLUMN_LABELS.get(metric, metric)


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _span(results: list[dict[str, Any]]) -> float | None:
    """Seconds from the first job's start to the last one's end (None unless every job says when)."""
    times = [(r["started_at"], r["finished_at"]) for r in results if "started_at" in r and "finished_at" in r]
    if not times or len(times) != len(results):
        return None
    return round(max(t[1] for t in times) - min(t[0] for t in times), 1)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _models(doc: dict[str, Any]) -> str:
    return doc["model"] if isinstance(doc["model"], str) else ", ".join(doc["model"])


def _unedited_rows(doc: dict[str, Any], table: str) -> list[tuple[str, dict[str, Any]]]:
    """The first rows of ``table``: the unedited model's scores (one row per model in a bench of several)."""
    by_model = doc.get("unedited_by_model")
    if by_model:
        return [(f"unedited @ {model}", scores[table] or {}) for model, scores in by_model.items()]
    return [("unedited model", doc["unedited"][table] or {})]


def _elapsed(jobs: dict[str, Any]) -> str:
    span, workers = jobs.get("span_s"), jobs.get("workers", 1)
    text = f", {workers} jobs at a time" if workers and workers > 1 else ""
    if jobs.get("executor"):
        text = f", jobs run as {jobs['executor']} tasks"
    return text + (f", {span / 60:.1f} min from the first job's start to the last one's end" if span else "")


def _load_warning(doc: dict[str, Any]) -> list[str]:
    load, cores = doc.get("load_avg_max"), doc["machine"]["cpu_count"] or 1
    if load is None or load <= cores:
        return []
    return [
        f"*The machine was shared while this ran (load average up to {load:.1f} on {cores} cores): times "
        "are upper bounds.*",
        "",
    ]


def render_markdown(doc: dict[str, Any], figure: str | None = None) -> str:
    """Markdown of the bench document (the README's bench section)."""
    d = doc["data"]
    fp = doc["model_fingerprint"]
    out = [
        f"Produced by `{doc['command']}` on {doc['date']} (kedit {doc['kedit_version']}, model {_models(doc)}, "
        f"fingerprint `{(fp if isinstance(fp, str) else ', '.join(fp))[:16]}`, {doc['machine']['cpu_count']} CPU cores"
        f"{', ' + doc['machine']['gpu'] if doc['machine']['gpu'] else ', no GPU'}, torch {doc['machine']['torch']}; "
        f"sum of job wall times {doc['jobs']['wall_s_sum'] / 60:.1f} min{_elapsed(doc['jobs'])}).",
        "",
        *_load_warning(doc),
        "**Table 1** — editing cost. Capabilities come from each method's flags. *10 edits*: ten times the median "
        f"seconds per edit over the CounterFact edits (each from the unedited model); *10 edits, batch*: one batch of "
        f"{doc['speed_n']} edits, scaled to 10; peak RSS of the editing process (model included); patch: mean size "
        "of one edit's patch.",
        "",
    ]
    rows = [
        [
            r["method"],
            _f(r["batch"]),
            _f(r["sequential"]),
            _f(r["training"]),
            r["edit_area"],
            _f(r["s_10_edits"], 1),
            _f(r["s_10_edits_batch"], 1),
            _f(r["peak_rss_mb"], 0),
            _f(r["patch_kb"], 1),
        ]
        + ([_f(r["peak_vram_mb"], 0)] if doc["machine"]["gpu"] else [])
        for r in doc["table1"]
    ]
    header = [
        "method",
        "batch",
        "sequential",
        "training",
        "edit area",
        "10 edits (s)",
        "10 edits, batch (s)",
        "peak RSS (MB)",
        "patch (KB)",
    ] + (["peak VRAM (MB)"] if doc["machine"]["gpu"] else [])
    out += [_md_table(header, rows), ""]
    zs = d["zsre"]
    out += [
        f"**Table 2** — ZsRE `{zs['file']}` records {zs['start']}–{zs['start'] + zs['n'] - 1} (fewer where *n* "
        "says so), each edit from the unedited model. " + PROTOCOL_LEGEND,
        "",
    ]
    names = metric_names("zsre")
    rows = [[label, "–"] + [_f(pre.get(m)) for m in names] + ["–"] for label, pre in _unedited_rows(doc, "zsre")]
    rows += [
        [r["method"], str(r["n"])] + [_f(r.get(m)) for m in names] + [_f(r["s_per_edit"], 2)] for r in doc["table2"]
    ]
    out += [_md_table(["method", "n", *map(column_label, names), "s/edit"], rows), ""]
    cf = d["counterfact"]
    out += [
        f"**CounterFact** `{cf['file']}` first {cf['n']} records, each edit from the unedited model: efficacy / "
        "paraphrase / neighborhood score (P(new) > P(true); neighborhood: P(true) > P(new)) and the generation "
        "protocol (locality: the neighborhood prompts' greedy answers unchanged).",
        "",
    ]
    names = metric_names("counterfact")
    rows = [[label, "–"] + [_f(pre.get(m)) for m in names] for label, pre in _unedited_rows(doc, "counterfact")]
    rows += [[r["method"], str(r["n"])] + [_f(r.get(m)) for m in names] for r in doc["counterfact"]]
    out += [_md_table(["method", "n", *map(column_label, names)], rows), ""]
    sq = d["sequential"]
    out += [
        f"**Sequential editing** — `{sq['file']}` records {sq['start']}–{sq['start'] + sq['n'] - 1} edited one "
        "after another: scores of all edits on the final model (after each edit in parentheses); the figure "
        "draws the unedited model's score as a dashed line.",
        "",
    ]
    names = metric_names("sequential")
    rows = [
        [r["method"], str(r["n"])] + [f"{_f(r['final'].get(m))} ({_f(r['after_each'].get(m))})" for m in names]
        for r in doc["sequential"]
    ]
    out += [_md_table(["method", "n", *map(column_label, names)], rows), ""]
    if figure:
        out += [f"![metrics against the number of sequential edits]({figure})", ""]
    for method, note in doc.get("notes", {}).items():
        out.append(f"- *{method}*: {note}")
    for job, err in doc.get("errors", {}).items():
        out.append(f"- **{job} failed**: {err}")
    if doc.get("not_run"):
        out.append(f"- not run yet (no result in the job cache): {', '.join(doc['not_run'])}")
    if doc.get("stale"):
        out.append(
            f"- computed with an earlier source of the method or of kedit-core (reused with --reuse-stale): "
            f"{', '.join(doc['stale'])}"
        )
    return "\n".join(out).rstrip() + "\n"


def write_figure(doc: dict[str, Any], path: Path) -> Path | None:
    if not doc["sequential"]:
        return None
    from ..evaluate.plot import plot_sequential

    runs = [(r["method"], {"per_request": r["per_request"]}) for r in doc["sequential"]]
    n = max(r["n"] for r in doc["sequential"])
    return plot_sequential(runs, path, title=f"Sequential ZsRE editing, {_models(doc)} (up to {n} edits)")


def update_readme(readme: Path, markdown: str) -> None:
    """Replace the text between the bench markers of ``readme`` with ``markdown``."""
    from ..errors import KeditError
    from ..fsutil import atomic_write_text

    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise KeditError(f"{readme}: no '{README_BEGIN}' ... '{README_END}' section to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, f"{head}{README_BEGIN}\n{markdown}{README_END}{tail}")


def readme_section(readme: Path) -> str | None:
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text:
        return None
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].lstrip("\n")
