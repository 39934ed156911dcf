"""Entry point of the ``kedit-ft`` plugin."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .ft import FTL, FTM

    register(FTL)
    register(FTM)
