"""Entry point of the ``kedit-mend`` plugin: methods are named here and imported on first use."""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec("mend", "kedit_mend.mend:MEND", batch=True, training=True, edit_area="FFN (gradient network)"))
    register(MethodSpec("ke", "kedit_mend.ke:KE", batch=True, training=True, edit_area="FFN (hyper-network)"))
