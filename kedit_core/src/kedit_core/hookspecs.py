"""The plugin API of kedit: pluggy markers and hook specifications.

A plugin is a module with functions decorated by :data:`hookimpl`, exposed through the ``kedit``
entry-point group::

    [project.entry-points.kedit]
    rome = "kedit_rome.plugin"
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kedit")
hookimpl = pluggy.HookimplMarker("kedit")


@hookspec
def register_methods(register):
    """Register editing methods.

    Called once, when the method registry is first used. ``register(cls)`` takes a subclass of
    :class:`kedit_core.method.EditMethod`; registering a name twice raises :class:`PluginError`.
    """


@hookspec
def register_architectures(register):
    """Register model architectures.

    ``register(spec)`` takes a :class:`kedit_core.architecture.ArchitectureSpec`; it is matched
    against ``config.architectures`` (or the model's class name) of a loaded model.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``kedit`` command line.

    ``cli`` is the root :class:`click.Group`; call ``cli.add_command(...)`` or decorate with
    ``@cli.command()``. Called once when the CLI starts.
    """


@hookspec
def patch_applied(patch, model):
    """Observe a patch after it was applied to ``model`` (``patch`` is a :class:`kedit_core.patch.Patch`)."""


@hookspec
def patch_reverted(patch, model):
    """Observe a patch after it was reverted from ``model``."""
