"""kedit-core's own plugin: the built-in architecture specs."""

from __future__ import annotations

from .architecture import BUILTIN_ARCHITECTURES
from .hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    for spec in BUILTIN_ARCHITECTURES:
        register(spec)
