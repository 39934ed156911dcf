"""Entry point of the ``kedit-rome`` plugin."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .memit import MEMIT
    from .pmet import PMET
    from .rome import ROME

    register(ROME)
    register(MEMIT)
    register(PMET)
    from .kn import KN

    register(KN)


@hookimpl
def register_commands(cli):
    from .trace.cli import trace

    cli.add_command(trace)
