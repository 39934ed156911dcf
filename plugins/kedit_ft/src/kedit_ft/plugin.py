"""Entry point of the ``kedit-ft`` plugin: methods are named here and imported on first use."""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec("ft-l", "kedit_ft.ft:FTL", batch=True))
    register(MethodSpec("ft-m", "kedit_ft.ft:FTM", batch=True))
