"""kedit: edit the factual knowledge of language models, evaluate the edit, ship it as a patch.

Importing ``kedit_core`` does no work; the names below load on first use::

    from kedit_core import Editor
    result = Editor(method="rome", model="gemma3-270m").edit([{"prompt": ..., "subject": ..., "target_new": ...}])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Editor": "kedit_core.editor",
    "EditResult": "kedit_core.editor",
    "EditRequest": "kedit_core.request",
    "Probe": "kedit_core.request",
    "load_requests": "kedit_core.request",
    "Patch": "kedit_core.patch",
    "Hyperparams": "kedit_core.hparams",
    "EditMethod": "kedit_core.method",
    "PatchKind": "kedit_core.method",
    "EditContext": "kedit_core.method",
    "ArchitectureSpec": "kedit_core.architecture",
    "load_model": "kedit_core.models",
    "Evaluator": "kedit_core.evaluate",
    "KeditError": "kedit_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kedit_core' has no attribute {name!r}")
