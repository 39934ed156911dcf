"""Entry point of the ``kedit-rome`` plugin."""

from kedit_core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .kn import KN

    register(KN)


@hookimpl
def register_commands(cli):
    from .trace.cli import trace

    cli.add_command(trace)
