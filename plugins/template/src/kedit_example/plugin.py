"""Entry point: kedit imports this module and calls its hook implementations."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .method import GradStep

    register(GradStep)
