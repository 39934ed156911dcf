"""The ``kedit`` command line. Human output by default, ``--json`` for machines.

Plugins add commands through the ``register_commands(cli)`` hook, called once in :func:`main`.
Starting the CLI imports neither torch nor transformers: ``--help``, ``kedit methods``, ``kedit models`` and
every check of the input answer at once; a command imports them when it loads a model.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import KeditError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """kedit: edit the factual knowledge of language models, measure it, ship it as a patch."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _add_core_commands() -> None:
    from . import bench, edit, methods, models, patch

    for command in (methods.methods, models.models, edit.edit, edit.evaluate, patch.patch, bench.bench):
        cli.add_command(command)
    try:
        from .train import train
    except ImportError:
        return
    cli.add_command(train)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 on a kedit error (one line on stderr), 2 on usage."""
    from ..plugins import get_registry

    if "methods" not in cli.commands:
        _add_core_commands()
        get_registry().add_commands(cli)
    try:
        cli.main(args=argv, prog_name="kedit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeditError as exc:
        click.echo(f"kedit: error: {exc}", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
