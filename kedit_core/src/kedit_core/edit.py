"""Edit: what a method computes -- typed tensors and method extras, no provenance.

A method's :meth:`~kedit_core.method.EditMethod.compute_edit` returns an :class:`Edit`; the core turns it
into a :class:`~kedit_core.patch.Patch` with everything that says where it came from (:func:`build_patch`):
method, plugin package and version from the registry, base model, hyperparameters, requests, parent.
Tensor names inside a patch file are made here and parsed in :mod:`kedit_core.patch`, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .hparams import Hyperparams
    from .method import EditContext, EditMethod
    from .patch import Patch
    from .request import EditRequest

DENSE, LOWRANK, STATE = "delta/", "lowrank/", "state/"


@dataclass
class Edit:
    """The tensors of one edit.

    ``dense``: parameter -> delta in the parameter's storage layout. ``lowrank``: parameter -> ``(a, b)``
    with ``delta = a @ b`` in that layout. ``state``: a module path (or, for memories, a name) -> its
    tensors (codebooks, adapters, memories). ``modules``: the modules a module-state edit wraps.
    ``fingerprint_params``: the parameters whose pre-edit fingerprints the patch records (default: those
    the deltas change). ``extra``: method-specific JSON metadata.
    """

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    fingerprint_params: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The patch file's tensors under their names (``delta/``, ``lowrank/.../a|b``, ``state/...``)."""
        out = {f"{DENSE}{param}": delta for param, delta in self.dense.items()}
        for param, (a, b) in self.lowrank.items():
            out[f"{LOWRANK}{param}/a"], out[f"{LOWRANK}{param}/b"] = a, b
        for group, tensors in self.state.items():
            out.update({f"{STATE}{group}/{name}": t for name, t in tensors.items()})
        return out


def build_patch(
    edit: Edit,
    *,
    method: EditMethod,
    model: nn.Module,
    hparams: Hyperparams,
    requests: list[EditRequest],
    ctx: EditContext,
    parent: str | None = None,
) -> Patch:
    """The patch for ``edit``, fingerprinted against ``model`` as it is now (before the edit is applied),
    with the provenance only the core knows."""
    from .patch import Patch
    from .plugins import plugin_of

    plugin = plugin_of(type(method))
    return Patch.create(
        method=method.name,
        kind=method.kind,
        model=model,
        tensors=edit.tensors(),
        base_model={"id": ctx.model_id, "fingerprint": ctx.model_fingerprint},
        hparams=hparams.to_dict(),
        requests=[r.model_dump(mode="json") for r in requests],
        plugin=plugin.package,
        plugin_version=plugin.version,
        parent=parent,
        modules=edit.modules,
        fingerprint_params=edit.fingerprint_params,
        extra=edit.extra,
    )
