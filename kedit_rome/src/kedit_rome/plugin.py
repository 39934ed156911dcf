"""Entry point of the ``kedit-rome`` plugin: methods are named here and imported on first use."""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec("rome", "kedit_rome.rome:ROME"))
    register(MethodSpec("memit", "kedit_rome.memit:MEMIT", batch=True))
    register(MethodSpec("pmet", "kedit_rome.pmet:PMET", batch=True))
    register(MethodSpec("alphaedit", "kedit_rome.alphaedit:AlphaEdit", batch=True))
    register(MethodSpec("kn", "kedit_rome.kn.method:KN", edit_area="FFN neurons"))


@hookimpl
def register_commands(cli):
    from .cli import trace, trace_layers

    cli.add_command(trace)
    cli.add_command(trace_layers)
