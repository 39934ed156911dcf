"""Entry point: kedit imports this module and calls its hook implementations.

Name each method with a MethodSpec ("module:Class" plus the class's capability flags, which kedit
checks against the class): the module is then imported only when the method is used, so `kedit --help`
and `kedit methods` stay fast.
"""

from kedit_core.hookspecs import MethodSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec("grad-step", "kedit_example.method:GradStep", batch=True))
