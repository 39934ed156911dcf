"""``kedit train``: train a method's components (MEND's gradient network, SERAC's scope classifier, ...)."""

from __future__ import annotations

import json

import click

from ..errors import KeditError
from .options import echo_json


@click.command()
@click.option("--method", required=True, help="A method that needs training (see `kedit methods`, column 'training').")
@click.option(
    "--model", "model", default="gemma3-270m", show_default=True, help="The base model the editor is trained for."
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option(
    "--data",
    required=True,
    help="Training records: a shipped data set (zsre-train, counterfact-train) or a ZsRE, CounterFact or "
    "EasyEdit JSON file.",
)
@click.option(
    "--val",
    type=click.Path(dir_okay=False),
    default=None,
    help="Validation records [default: a seeded val_fraction of --data].",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory (resumed if it holds a state)."
)
@click.option(
    "--hparams", type=click.Path(dir_okay=False), default=None, help="YAML/JSON hyperparameters [the method's preset]."
)
@click.option("--max-steps", type=int, default=None, help="Override the hyperparameters' max_steps.")
@click.option("--limit", type=int, default=None, help="Use the first N training records.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(method, model, device, dtype, data, val, out, hparams, max_steps, limit, as_json) -> None:
    """Train METHOD's components on --data and write a safetensors checkpoint to --out.

    Use it at edit time with `kedit edit|eval --method METHOD --checkpoint OUT`.
    """
    from ..plugins import get_registry
    from ..trainer import load_training_requests

    if max_steps is not None and max_steps < 1:
        raise click.UsageError("--max-steps must be at least 1")
    if not get_registry().lookup(method).capabilities()["training"]:
        raise KeditError(f"method {method!r} has nothing to train")
    train_reqs = load_training_requests(data, limit)
    val_reqs = load_training_requests(val) if val else None
    from ..editor import Editor
    from ..models import model_key

    m = get_registry().method(method)
    hp = m.load_hparams(hparams, model_key(model))  # checked before the (slow) model load
    if max_steps is not None:
        hp = hp.updated(max_steps=max_steps)
    editor = Editor(m, model, hparams=hp, device=device, dtype=dtype, progress=True)
    trainer = editor.trainer(train_reqs, val_reqs, out)
    info = editor.model_info
    result = trainer.run()
    report = {"method": m.name, "model": info.id, **result.as_dict()}
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"trained {m.name} for {info.id}: {result.steps} steps in {result.seconds:.1f} s"
        f"{' (early stop)' if result.stopped_early else ''}; best validation loss "
        f"{result.best_val_loss:.4f} at step {result.best_step}"
    )
    click.echo(f"checkpoint written to {out}; use it with --checkpoint {out}")
    if result.history:
        click.echo("last validation: " + json.dumps(result.history[-1]))
