"""``kedit methods``: the installed editing methods, and plugins that failed to load."""

from __future__ import annotations

import click

from .options import echo_json, table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json: bool) -> None:
    """List installed editing methods with their package, version and capabilities."""
    from ..plugins import get_registry

    registry = get_registry()
    rows = []
    for name, info in sorted(registry.methods.items()):
        rows.append({"method": name, "package": info.plugin.package, "version": info.plugin.version,
                     **info.cls.capabilities(), "presets": sorted(info.cls.presets())})
    broken = [{"plugin": b.name, "package": b.package, "version": b.version, "error": b.error} for b in registry.broken]
    if as_json:
        echo_json({"methods": rows, "broken": broken})
        return
    header = ["method", "package", "version", "batch", "sequential", "training", "edit area", "patch kind"]
    click.echo(table([[r["method"], r["package"], r["version"], r["batch"], r["sequential"], r["training"],
                       r["edit_area"], r["kind"]] for r in rows], header))
    for b in broken:
        click.echo(f"broken plugin {b['plugin']} ({b['package']} {b['version']}): {b['error']}", err=True)
