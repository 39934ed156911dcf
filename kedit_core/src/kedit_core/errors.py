"""kedit's exceptions: every failure a user can cause ends in a subclass of :class:`KeditError`."""

from __future__ import annotations


class KeditError(Exception):
    """Base class of every error kedit raises on purpose (bad input, wrong model, corrupt file)."""


class RequestError(KeditError, ValueError):
    """An edit request or a data file is malformed (missing field, subject not in prompt, ...)."""


class HparamsError(KeditError, ValueError):
    """A hyperparameter file or mapping does not validate."""


class EditError(KeditError):
    """An editing method failed while computing an edit (its original exception is the ``__cause__``)."""


class RunLocked(KeditError):
    """A resumable run's directory is in use by another process."""


class PatchError(KeditError):
    """A patch file is corrupt, or cannot be applied or reverted."""


class FingerprintMismatch(PatchError):
    """A patch was computed on other weights than the model it is applied to."""


class CheckpointError(KeditError):
    """A trained editor's checkpoint is missing, malformed, or was trained for another model."""


class ArchitectureError(KeditError):
    """The model's architecture is not in the registry, or a module path does not resolve."""


class PluginError(KeditError):
    """A plugin is missing, broken, or registers something invalid."""


class UnknownMethod(PluginError, LookupError):
    """No installed plugin provides the requested method."""


class ModelLoadError(KeditError):
    """A model name, directory or file could not be loaded."""
