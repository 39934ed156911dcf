"""``kedit patch show|apply|revert|export|import``."""

from __future__ import annotations

import click

from ..errors import KeditError
from .options import echo_json, model_options


@click.group()
def patch() -> None:
    """Inspect, apply, revert, export and import patch files."""


@patch.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def show(path: str, as_json: bool) -> None:
    """Print a patch's provenance and contents."""
    from ..patch import Patch

    s = Patch.load(path).summary()
    if as_json:
        echo_json(s)
        return
    click.echo(
        f"patch {s['patch_id']}  {s['method']} ({s['kind']})  plugin {s['plugin'] or '-'}  core {s['core_version']}"
    )
    click.echo(f"base model: {s['base_model']}")
    click.echo(f"parent: {s['parent'] or '-'}   created: {s['created_at']}   {s['bytes']} bytes of tensors")
    for r in s["requests"]:
        click.echo(f"  edit: {r['prompt']!r} -> {r['target_new']!r} (subject {r['subject']!r})")
    for name, t in s["tensors"].items():
        click.echo(f"  {name}  {t['dtype']}{t['shape']}")


def check_against_known_weights(patches: list, model: str, dtype: str) -> None:
    """Refuse, before the model is loaded, patches computed on other weights than ``model``'s, when kedit
    recorded that model's parameter fingerprints (models it converted). Patches apply in order: a
    parameter an earlier patch of the list changes is checked by ``apply`` later, not here."""
    from ..models import known_parameter_fingerprints

    known = known_parameter_fingerprints(model, dtype)
    if not known:
        return
    changed: set[str] = set()
    for p in patches:
        p.check_fingerprints(known.get, skip=changed, note=f" ({model}, checked before loading the model)")
        changed.update(p.metadata["fingerprints"])


def _load(model: str, device: str, dtype: str, device_map: str | None):
    from ..models import load_model

    return load_model(model, device=device, dtype=dtype, device_map=device_map)


def _complete(model, tokenizer, prompts: tuple[str, ...], max_new_tokens: int) -> None:
    from ..evaluate import Evaluator

    texts = Evaluator(model, tokenizer).generate(list(prompts), max_new_tokens)
    for p, text in zip(prompts, texts, strict=True):
        click.echo(f"{p} -> {text.strip()!r}")


@patch.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@model_options
@click.option("--save-to", type=click.Path(file_okay=False), default=None, help="Save the edited model here.")
@click.option("--prompt", multiple=True, help="Print the edited model's completion of this prompt (repeatable).")
@click.option("--max-new-tokens", default=12, show_default=True)
def apply(paths, model, device, dtype, device_map, save_to, prompt, max_new_tokens) -> None:
    """Apply patches (in order) to MODEL; print completions and/or save the edited model."""
    from ..method import PatchKind
    from ..patch import Patch

    patches = [Patch.load(p) for p in paths]  # every file is validated before the model is loaded
    if save_to and any(p.kind is not PatchKind.WEIGHT_DELTA for p in patches):
        raise KeditError(
            "only weight_delta patches can be merged into saved weights; apply module/memory patches at run time"
        )
    check_against_known_weights(patches, model, dtype)
    m, tok, _ = _load(model, device, dtype, device_map)
    for p in patches:
        p.apply(m, tokenizer=tok)
        click.echo(f"applied {p.patch_id} ({p.method})", err=True)
    _complete(m, tok, prompt, max_new_tokens)
    if save_to:
        m.save_pretrained(save_to)
        tok.save_pretrained(save_to)
        click.echo(f"edited model saved to {save_to}")


@patch.command()
@click.argument("path", type=click.Path(dir_okay=False))
@model_options
@click.option("--save-to", type=click.Path(file_okay=False), default=None, help="Save the reverted model here.")
@click.option("--prompt", multiple=True, help="Print the reverted model's completion of this prompt (repeatable).")
@click.option("--max-new-tokens", default=12, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def revert(path, model, device, dtype, device_map, save_to, prompt, max_new_tokens, as_json) -> None:
    """Revert a weight patch from an edited MODEL using the file alone.

    Refuses unless MODEL holds exactly the weights the patch writes; then reports per parameter whether
    the result is bit-exact and, if not, a bound on its distance to the pre-edit weights.
    """
    from ..patch import Patch

    p = Patch.load(path)
    m, tok, _ = _load(model, device, dtype, device_map)
    report = p.revert_from_file(m)
    if as_json:
        echo_json(report)
    else:
        for name, r in report.items():
            click.echo(f"reverted {name}: {r['summary']}")
    _complete(m, tok, prompt, max_new_tokens)
    if save_to:
        m.save_pretrained(save_to)
        tok.save_pretrained(save_to)
        click.echo(f"reverted model saved to {save_to}")


@patch.command("export")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the adapter.")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Truncated-SVD rank for dense deltas.")
@click.option("--json", "as_json", is_flag=True)
def export(paths, fmt, out, rank, as_json) -> None:
    """Export weight-delta patches (a chain, in order) as one peft LoRA adapter.

    Low-rank deltas (ROME, MEMIT) are exact; dense ones (FT-L, FT-M) need --rank and are a truncated SVD
    whose relative error is reported. Needs pip install 'kedit-core[peft]'.
    """
    from ..export_peft import export_peft
    from ..patch import Patch

    report = export_peft([Patch.load(p) for p in paths], out, rank=rank)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.describe())


@patch.command("import")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The patch file to write.")
def import_(directory, out) -> None:
    """Read a peft adapter kedit exported back into a patch (one exact patch comes back as itself)."""
    from ..export_peft import import_peft

    p = import_peft(directory)
    p.save(out)
    click.echo(f"patch {p.patch_id} ({p.method}) written to {out}")
