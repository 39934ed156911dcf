"""``kedit methods``: the installed editing methods, name clashes, and plugins that failed to load."""

from __future__ import annotations

import click

from .options import echo_json, table


def _yes_no(value: object) -> object:
    return ("yes" if value else "no") if isinstance(value, bool) else value


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json: bool) -> None:
    """List installed editing methods with their package, version and capabilities."""
    from ..plugins import get_registry

    registry = get_registry()
    rows = []
    for name, infos in sorted(registry.claims.items()):
        for info in infos:
            rows.append(
                {
                    "method": name if len(infos) == 1 else info.qualified,
                    "package": info.plugin.package,
                    "version": info.plugin.version,
                    **info.capabilities(),
                    "presets": sorted(info.presets()),
                    "clash": len(infos) > 1,
                }
            )
    broken = [{"plugin": b.name, "package": b.package, "version": b.version, "error": b.error} for b in registry.broken]
    if as_json:
        echo_json({"methods": rows, "broken": broken})
        return
    header = ["method", "package", "version", "batch", "sequential", "training", "edit area", "patch kind"]
    keys = ["method", "package", "version", "batch", "sequential", "training", "edit_area", "kind"]
    click.echo(table([[_yes_no(r[k]) for k in keys] for r in rows], header))
    for name, infos in sorted(registry.clashes.items()):
        who = " and ".join(f"{i.plugin.package} (plugin {i.plugin.name})" for i in infos)
        click.echo(
            f"method name {name!r} is registered by {who}: use one of {', '.join(i.qualified for i in infos)}", err=True
        )
    for b in broken:
        click.echo(f"broken plugin {b['plugin']} ({b['package']} {b['version']}): {b['error']}", err=True)
