"""``kedit trace``: causal tracing of one fact from the command line (added by the kedit-rome plugin; kept
outside the ``trace`` package so that registering the command imports no torch)."""

from __future__ import annotations

import json

import click

from kedit_core.errors import KeditError


@click.command("trace")
@click.option(
    "--model",
    default="gemma3-270m",
    show_default=True,
    help="gemma3-270m, a local HF directory, a .gguf file, or a HF id.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--prompt", required=True, help="The fact's prompt, e.g. 'The Eiffel Tower is located in the city of'.")
@click.option("--subject", required=True, help="The subject, as it occurs in the prompt.")
@click.option(
    "--answer",
    default=None,
    help="Expected answer (its first token is traced); default: the model's greedy next token.",
)
@click.option(
    "--kind",
    type=click.Choice(["hidden", "mlp", "attn", "all"]),
    default="hidden",
    show_default=True,
    help="Restore hidden states, or MLP / attention outputs over a window of layers; 'all' runs the three.",
)
@click.option(
    "--samples", default=10, show_default=True, type=click.IntRange(1), help="Noise samples averaged per cell."
)
@click.option(
    "--window", default=10, show_default=True, type=click.IntRange(1), help="Layers restored together for mlp/attn."
)
@click.option(
    "--noise",
    default=3.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Noise std as a multiple of the embeddings' std over the vocabulary.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "prefix", default="trace", show_default=True, help="Write <PREFIX>_<kind>.json and .png.")
@click.option("--no-png", is_flag=True, help="Write only the JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def trace(
    model: str,
    device: str,
    dtype: str,
    prompt: str,
    subject: str,
    answer: str | None,
    kind: str,
    samples: int,
    window: int,
    noise: float,
    seed: int,
    prefix: str,
    no_png: bool,
    as_json: bool,
) -> None:
    """Causal tracing (ROME paper, figure 1): corrupt the subject, restore states, map indirect effects."""
    from kedit_core.models import load_model
    from kedit_core.progress import step

    from .trace.causal_trace import causal_trace
    from .trace.plot import save_trace

    if subject not in prompt:
        raise KeditError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    with step(f"loading {model}"):
        lm, tokenizer, _ = load_model(model, device=device, dtype=dtype)
    kinds = ["hidden", "mlp", "attn"] if kind == "all" else [kind]
    report = []
    for k in kinds:
        result = causal_trace(
            lm,
            tokenizer,
            prompt,
            subject,
            answer=answer,
            kind=k,
            samples=samples,
            noise=noise,
            window=window,
            seed=seed,
            progress=True,
        )
        paths = save_trace(result, prefix, png=not no_png)
        entry = {
            "kind": k,
            "answer": result.answer,
            "clean_prob": result.clean_prob,
            "corrupted_prob": result.corrupted_prob,
            "peak_layers_subject_last": result.peak_layers(),
            "files": {name: str(p) for name, p in paths.items()},
        }
        report.append(entry if not as_json else {**entry, "trace": result.to_json()})
        if not as_json:
            click.echo(
                f"{k:6s} answer {result.answer!r}: P clean {result.clean_prob:.4f}, corrupted "
                f"{result.corrupted_prob:.4f}; peak layers at the subject's last token "
                f"{result.peak_layers()}; wrote {', '.join(str(p) for p in paths.values())}"
            )
    if as_json:
        click.echo(json.dumps(report if len(report) > 1 else report[0], indent=1))


@click.command("trace-layers")
@click.option(
    "--model", default="gemma3-270m", show_default=True, help="A built-in key, HF directory, .gguf file or id."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--data", default="counterfact", show_default=True, help="Records to take known facts from.")
@click.option("--facts", default=12, show_default=True, type=click.IntRange(1), help="Known facts to average over.")
@click.option("--kind", type=click.Choice(["hidden", "mlp", "attn"]), default="mlp", show_default=True)
@click.option("--window", default=4, show_default=True, type=click.IntRange(1), help="Layers restored together.")
@click.option("--samples", default=10, show_default=True, type=click.IntRange(1), help="Noise samples per fact.")
@click.option("--out", "out", default=None, help="Write the profile (per-fact effects included) as JSON here.")
def trace_layers(
    model: str, device: str, dtype: str, data: str, facts: int, kind: str, window: int, samples: int, out: str | None
) -> None:
    """Which layers to edit: the mean indirect effect at the subject's last token over facts the model knows
    (ROME paper, Fig. 2), one row per layer."""
    from pathlib import Path

    from kedit_core.models import load_model
    from kedit_core.progress import step
    from kedit_core.request import load_requests

    from .trace.profile import known_facts, subject_last_profile

    requests = load_requests(data)
    with step(f"loading {model}"):
        lm, tokenizer, _ = load_model(model, device=device, dtype=dtype)
    candidates = ((r.prompt, r.subject, r.ground_truth) for r in requests if r.ground_truth)
    with step(f"choosing {facts} facts the model knows from {data}"):
        chosen = known_facts(lm, tokenizer, candidates, facts)
    if not chosen:
        raise KeditError(f"the model knows none of the facts in {data} (P(true answer) >= 0.05, rank < 3)")
    what = f"{kind}, window {window}" if kind != "hidden" else kind
    with step(f"tracing {len(chosen)} facts ({what}, {samples} samples)"):
        profile = subject_last_profile(lm, tokenizer, chosen, kind=kind, window=window, samples=samples, progress=True)
    top = max(max(profile.mean_effect), 1e-9)
    click.echo(f"{what}, {profile.n_facts} facts: mean indirect effect at the subject's last token")
    click.echo("layer  effect  normalized")
    for layer, (e, ne) in enumerate(zip(profile.mean_effect, profile.mean_normalized_effect, strict=True)):
        click.echo(f"{layer:5d} {e:7.3f} {ne:11.3f}  {'#' * round(30 * max(e, 0) / top)}")
    click.echo(f"peak layers: {profile.peak_layers()}")
    if out:
        Path(out).write_text(json.dumps({"model": model, "data": data, **profile.to_json()}, indent=1) + "\n")
        click.echo(f"wrote {out}")
