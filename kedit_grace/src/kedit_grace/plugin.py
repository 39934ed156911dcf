"""Entry point of the ``kedit-grace`` plugin."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .grace.method import GRACE
    from .melo.method import MELO

    register(GRACE)
    register(MELO)
