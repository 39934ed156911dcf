"""``kedit edit`` (one edit, before/after completions) and ``kedit eval`` (a data file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .. import progress
from ..evaluate.metrics import metric_names, protocols
from .options import echo_json, fmt, model_options, prompt_form_option, table


def check_method(method: str) -> None:
    """Refuse an unknown or ambiguous method name before torch is imported."""
    from ..plugins import get_registry

    get_registry().lookup(method)


def _editor(
    method: str,
    model: str,
    hparams: str | None,
    device: str,
    dtype: str,
    device_map: str | None,
    checkpoint: str | None,
    progress: bool,
) -> Any:
    """Method, hyperparameters and dtype are checked before the (slow) model load."""
    from .. import progress as steps
    from ..models import check_dtype, model_key
    from ..plugins import get_registry

    check_dtype(dtype)
    from ..editor import Editor  # imports torch: after the checks that need none

    edit_method = get_registry().method(method)
    hp = edit_method.load_hparams(hparams, model_key(model))
    with steps.step(f"loading {model}"):
        return Editor(
            edit_method,
            model,
            hparams=hp,
            device=device,
            dtype=dtype,
            device_map=device_map,
            checkpoint=checkpoint,
            progress=progress,
        )


@click.command()
@click.option("--method", required=True, help="Editing method (see `kedit methods`).")
@model_options
@click.option("--prompt", required=True, help="The prompt whose completion to change.")
@click.option("--subject", required=True, help="The subject; must occur in the prompt.")
@click.option("--target", "target", required=True, help="The new completion (target_new).")
@click.option("--ground-truth", default=None, help="The current true completion (for the CounterFact scores).")
@click.option("--rephrase", multiple=True, help="A paraphrase of the prompt (repeatable).")
@click.option("--locality-prompt", multiple=True, help="An unrelated prompt whose answer must not change (repeatable).")
@click.option("--locality-answer", multiple=True, help="Its answer, one per --locality-prompt.")
@click.option(
    "--hparams",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML/JSON hyperparameters (default: the method's preset).",
)
@click.option("--checkpoint", type=click.Path(), default=None, help="Trained editor directory (MEND, SERAC, ...).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the patch [out/<method>-<id>.kedit.safetensors].",
)
@click.option("--max-new-tokens", default=12, show_default=True)
@prompt_form_option
@click.option(
    "--no-generation",
    is_flag=True,
    help="Score the teacher-forced protocol only (no generation-scored metrics, fluency or degeneracy check).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def edit(
    method,
    model,
    device,
    dtype,
    device_map,
    prompt,
    subject,
    target,
    ground_truth,
    rephrase,
    locality_prompt,
    locality_answer,
    hparams,
    checkpoint,
    out,
    max_new_tokens,
    prompt_form,
    no_generation,
    as_json,
) -> None:
    """Make one edit, print completions and metrics before and after, and write the patch."""
    from ..chat import present
    from ..request import EditRequest

    if len(locality_prompt) != len(locality_answer):
        raise click.UsageError("give one --locality-answer per --locality-prompt")
    check_method(method)
    request = EditRequest.create(
        prompt=prompt,
        subject=subject,
        target_new=target,
        ground_truth=ground_truth,
        rephrase_prompts=list(rephrase),
        locality=[{"prompt": p, "target": a} for p, a in zip(locality_prompt, locality_answer, strict=False)],
    )
    mark = progress.mark()
    editor = _editor(method, model, hparams, device, dtype, device_map, checkpoint, progress=False)
    presented = present([request], editor.tokenizer, prompt_form)[0]
    report = _edit_and_compare(editor, presented, max_new_tokens, out, generation=not no_generation)
    report["prompt_form"] = prompt_form
    report["time"] = _time_report(mark, report.pop("_edit_itself_s"))
    if as_json:
        echo_json(report)
        return
    _print_edit(report, request)


def _edit_and_compare(
    editor: Any, request: Any, max_new_tokens: int, out: str | None, generation: bool = True
) -> dict[str, Any]:
    """Completions before and after one edit, its metrics, and the written patch, as the report."""
    ev = editor.evaluator()
    prompts = _shown_prompts(request)
    with progress.step("generating with the unedited model"):
        before = ev.generate(prompts, max_new_tokens, show_special=True)
    with progress.step(f"editing with {editor.method.name} and scoring before and after"):
        result = editor.edit([request], generation=generation)
    patch = result.patches[0]
    with progress.step("generating with the edited model"), patch.applied(editor.model, tokenizer=editor.tokenizer):
        after = ev.generate(prompts, max_new_tokens, show_special=True)
    path = Path(out) if out else Path("out") / f"{patch.method}-{patch.patch_id}.kedit.safetensors"
    patch.save(path)
    return {
        "method": editor.method.name,
        "model": editor.model_info.id,
        "patch": str(path),
        "patch_id": patch.patch_id,
        "patch_bytes": path.stat().st_size,
        "edit_seconds": result.edit_seconds[0],
        "completions": [
            {"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=False)
        ],
        "metrics_pre": result.pre[0],
        "metrics_post": result.post[0],
        "protocols": {k: v for k, v in protocols().items() if k in result.post[0]},
        "degenerate": result.degenerate("post")[0][1] if result.degenerate("post") else [],
        "peak_rss_mb": result.peak_rss_mb,
        # one-time steps (key statistics, templates, ...) run inside the edit: the edit itself is the rest
        "_edit_itself_s": result.time_per_edit_s,
    }


def _shown_prompts(request: Any) -> list[str]:
    """The prompts whose completions ``kedit edit`` shows: the edit prompt, paraphrases, locality prompts."""
    return [request.prompt, *request.rephrase_prompts, *[p.prompt for p in request.locality]]


def _time_report(mark: int, edit_itself: float) -> dict[str, Any]:
    """Where the time went: one-time steps (cached for later runs) apart from the rest."""
    steps = progress.recorded(mark)
    one_time = [{"step": s.what, "seconds": s.seconds} for s in steps if s.one_time]
    one_time_s = sum(s["seconds"] for s in one_time)
    total = sum(s.seconds for s in steps if not s.one_time)
    return {
        "total_s": total,
        "one_time_s": one_time_s,
        "one_time": one_time,
        "edit_itself_s": edit_itself,
        "phases": [{"step": s.what, "seconds": s.seconds} for s in steps if not s.one_time],
    }


def metric_table(*columns: dict[str, float], header: list[str]) -> str:
    """Metrics in display order, one column per dict, with the protocol that produced each."""
    names = [m for m in metric_names() if m in columns[-1]]
    short = {k: v.split(":")[0] for k, v in protocols().items()}
    rows = [[m, *[c.get(m) for c in columns], short.get(m, "")] for m in names]
    return table(rows, ["metric", *header, "protocol"])


def _print_edit(report: dict[str, Any], request: Any) -> None:
    """The report, each prompt shown as written (``request``, before any chat template)."""
    chat = " (each prompt asked through the chat template)" if report["prompt_form"] == "chat" else ""
    click.echo(f"{report['method']} on {report['model']}: {request.subject!r} -> {request.target_new!r}{chat}\n")
    for text, c in zip(_shown_prompts(request), report["completions"], strict=True):
        click.echo(f"  {text}")
        click.echo(f"    before: {c['before'].strip()!r}")
        click.echo(f"    after:  {c['after'].strip()!r}")
    click.echo("")
    pre, post = report["metrics_pre"], report["metrics_post"]
    click.echo(metric_table(pre, post, header=["before", "after"]))
    for flag in report["degenerate"]:
        click.echo(f"warning: the edited model degenerates: {flag}")
    t = report["time"]
    click.echo(f"\nedit took {t['edit_itself_s']:.2f} s; peak RSS {report['peak_rss_mb']:.0f} MB")
    if t["one_time"]:
        steps = ", ".join(f"{s['step']} {s['seconds']:.1f} s" for s in t["one_time"])
        click.echo(f"one-time work this run (cached for later runs): {steps}")
    click.echo(f"total {t['total_s']:.1f} s: " + ", ".join(f"{p['step']} {p['seconds']:.1f} s" for p in t["phases"]))
    click.echo(f"patch {report['patch_id']} ({report['patch_bytes']} bytes) written to {report['patch']}")


@click.command("eval")
@click.option("--method", required=True, help="Editing method (see `kedit methods`).")
@model_options
@click.option(
    "--data",
    required=True,
    help="A shipped data set (counterfact, zsre, zsre-train, counterfact-train) or a CounterFact, ZsRE, "
    "EasyEdit or kedit JSON/JSONL file.",
)
@click.option("--limit", type=int, default=None, help="Use the first N records.")
@click.option("--batch-size", type=int, default=None, help="Requests per edit (methods that batch).")
@click.option("--sequential", is_flag=True, help="Keep earlier edits (scored after each edit and at the end).")
@click.option(
    "--no-generation",
    is_flag=True,
    help="Score the teacher-forced protocol only (faster: no greedy decoding, fluency or degeneracy check).",
)
@click.option("--hparams", type=click.Path(dir_okay=False), default=None)
@click.option("--checkpoint", type=click.Path(), default=None, help="Trained editor directory (MEND, SERAC, ...).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="With --sequential: PNG of metrics against edits."
)
@prompt_form_option
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --sequential: save progress here after every edit; the same command run again resumes.",
)
def evaluate(
    method,
    model,
    device,
    dtype,
    device_map,
    data,
    limit,
    batch_size,
    sequential,
    no_generation,
    hparams,
    checkpoint,
    json_out,
    plot,
    prompt_form,
    run_dir,
) -> None:
    """Edit every request of a data file and print the metric table."""
    from ..chat import present
    from ..fsutil import atomic_write_text
    from ..request import load_requests

    if plot and not sequential:
        raise click.UsageError("--plot needs --sequential")
    if run_dir and not sequential:
        raise click.UsageError("--run-dir needs --sequential")
    if limit is not None and limit < 1:
        raise click.UsageError("--limit must be at least 1")
    check_method(method)
    requests = load_requests(data, limit=limit)
    editor = _editor(method, model, hparams, device, dtype, device_map, checkpoint, progress=True)
    requests = present(requests, editor.tokenizer, prompt_form)
    result = editor.edit(
        requests, sequential=sequential, batch_size=batch_size, generation=not no_generation, run_dir=run_dir
    )
    report = result.to_report()
    report["data"] = str(data)
    report["prompt_form"] = prompt_form
    if json_out:
        atomic_write_text(json_out, json.dumps(report, indent=2, default=str))
    if plot:
        from ..evaluate.plot import plot_sequential

        plot_sequential([(editor.method.name, result)], plot)
    pre, post = report["metrics_pre"], (report.get("metrics_after_each") or report["metrics"])
    columns = [pre, post] + ([report["metrics"]] if sequential else [])
    header = ["pre", "post (after each)" if sequential else "post"] + (["final"] if sequential else [])
    click.echo(
        f"{report['method']} on {report['model']}, {report['n']} requests from {data}"
        f"{' (sequential)' if sequential else ''}, batch size {report['batch_size']}"
        f"{', prompts through the chat template' if prompt_form == 'chat' else ''}"
    )
    click.echo(metric_table(*columns, header=header))
    bad = result.degenerate("final" if sequential else "post")
    if bad:
        first = ", ".join(f"#{i} ({flags[0]})" for i, flags in bad[:3])
        click.echo(
            f"warning: {len(bad)} of {report['n']} requests degenerate after the edit: {first}"
            + (" ..." if len(bad) > 3 else "")
        )
    click.echo(
        f"time per edit {fmt(report['time_per_edit_s'])} s; peak RSS {report['peak_rss_mb']:.0f} MB"
        + (f"; peak CUDA {report['peak_cuda_mb']:.0f} MB" if report.get("peak_cuda_mb") else "")
    )
    if json_out:
        click.echo(f"report written to {json_out}")
    if plot:
        click.echo(f"plot written to {plot}")
