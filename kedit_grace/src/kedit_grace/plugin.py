"""Entry point of the ``kedit-grace`` plugin: methods are named here and imported on first use."""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec("grace", "kedit_grace.grace.method:GRACE", edit_area="codebook", kind="module_state"))
    register(MethodSpec("melo", "kedit_grace.melo.method:MELO", edit_area="LoRA blocks", kind="module_state"))
    register(
        MethodSpec("wise", "kedit_grace.wise.method:WISE", batch=True, edit_area="side memory", kind="module_state")
    )
