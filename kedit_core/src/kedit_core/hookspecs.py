"""The plugin API of kedit: pluggy markers, hook specifications and :class:`MethodSpec`.

A plugin is a module with functions decorated by :data:`hookimpl`, exposed through the ``kedit``
entry-point group::

    [project.entry-points.kedit]
    rome = "kedit_rome.plugin"

The module is imported whenever the registry loads (``kedit --help`` included): keep its imports to
``kedit_core.hookspecs`` and name methods with :class:`MethodSpec`, so that torch loads only when a
method is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

hookspec = pluggy.HookspecMarker("kedit")
hookimpl = pluggy.HookimplMarker("kedit")


@dataclass(frozen=True)
class MethodSpec:
    """A method named without importing it: ``target`` is ``"package.module:Class"``, imported on first
    use. The capability fields repeat the class's flags so ``kedit methods`` can list the method
    without importing torch; the registry checks them against the class when it loads, and a mismatch
    makes the method unusable with a message saying which flag differs."""

    name: str
    target: str
    batch: bool = False
    sequential: bool = True
    training: bool = False
    edit_area: str = "FFN"
    kind: str = "weight_delta"

    def capabilities(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "sequential": self.sequential,
            "training": self.training,
            "edit_area": self.edit_area,
            "kind": self.kind,
        }


@hookspec
def register_methods(register):
    """Register editing methods.

    Called once, when the method registry is first used. ``register(spec_or_cls)`` takes a
    :class:`MethodSpec` (preferred: the class is imported on first use) or a subclass of
    :class:`kedit_core.method.EditMethod`. Two plugins that register the same name are both kept and
    reported as a clash: the bare name is then refused and ``package:name`` picks one.
    """


@hookspec
def register_architectures(register):
    """Register model architectures.

    ``register(spec)`` takes a :class:`kedit_core.architecture.ArchitectureSpec`; it is matched
    against ``config.architectures`` (or the model's class name) of a loaded model.
    """


@hookspec
def register_metrics(register):
    """Register evaluation metrics (or judges) beside the built-in ones.

    ``register(metric)`` takes a :class:`kedit_core.evaluate.metrics.Metric` whose
    ``compute(evaluator, requests, references)`` returns one value (or None) per request, measured on the
    model as the evaluator holds it (``evaluator.model``, ``evaluator.tokenizer``, ``evaluator.generate``);
    its ``protocol`` is printed in every report, its ``tables`` name the bench tables that show it. A name
    already taken is refused and the plugin reported as broken.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``kedit`` command line.

    ``cli`` is the root :class:`click.Group`; call ``cli.add_command(...)`` or decorate with
    ``@cli.command()``. Called once when the CLI starts; a command whose name is already taken is
    refused (the plugin is reported as broken) and the existing command kept.
    """


@hookspec
def patch_applied(patch, model):
    """Observe a patch after it was applied to ``model`` (``patch`` is a :class:`kedit_core.patch.Patch`)."""


@hookspec
def patch_reverted(patch, model):
    """Observe a patch after it was reverted from ``model``."""
