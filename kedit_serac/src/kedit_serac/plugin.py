"""Entry point of the ``kedit-serac`` plugin: methods are named here and imported on first use."""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(
        MethodSpec(
            "serac",
            "kedit_serac.serac:SERAC",
            batch=True,
            training=True,
            edit_area="memory (scope classifier + counterfactual model)",
            kind="memory",
        )
    )
    register(MethodSpec("ike", "kedit_serac.ike:IKE", batch=True, edit_area="in-context", kind="memory"))
