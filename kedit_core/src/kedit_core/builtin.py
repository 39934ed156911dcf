"""kedit-core's own plugin: the built-in architecture specs."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    from .architecture import BUILTIN_ARCHITECTURES

    for spec in BUILTIN_ARCHITECTURES:
        register(spec)
