"""Entry point of the ``kedit-serac`` plugin."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .ike import IKE
    from .serac import SERAC

    register(SERAC)
    register(IKE)
