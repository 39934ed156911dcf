"""Checks a patch passes before it changes a model, and the error bound of a revert from the file.

- :func:`shared_storage`: two parameters of one weight patch in the same memory (tied embeddings) would
  take the delta twice and defeat the saved-copy revert.
- :func:`check_module_targets`: a module-state patch wraps only modules of the role its method declares
  (``EditMethod.wraps``), exactly the modules whose parameters it fingerprints.
- :func:`revert_error_bound`: how far a weight reverted by subtraction can be from the pre-edit weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .architecture import ArchitectureSpec, get_module, weight_value
from .errors import KeditError, PatchError
from .method import PatchKind

if TYPE_CHECKING:
    from .patch import Patch


def _span(p: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` that ``p``'s elements occupy."""
    if p.numel() == 0:
        return p.data_ptr(), p.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride(), strict=True))
    return p.data_ptr(), p.data_ptr() + (last + 1) * p.element_size()


def shared_storage(model: nn.Module, names: Iterable[str]) -> tuple[str, str] | None:
    """The first two of ``names`` whose parameters overlap in memory (tied weights), or None. An
    offloaded weight is checked where its value lives (accelerate's offload map)."""
    seen: list[tuple[str, torch.device, int, int]] = []
    for name in names:
        p = weight_value(model, name)
        if p.device.type == "meta":
            continue
        lo, hi = _span(p)
        for other, device, olo, ohi in seen:
            if device == p.device and lo < ohi and olo < hi:
                return other, name
        seen.append((name, p.device, lo, hi))
    return None


def check_shared_storage(patch: Patch, model: nn.Module, names: Iterable[str]) -> None:
    pair = shared_storage(model, names)
    if pair is not None:
        pid = patch.metadata.get("patch_id")
        raise PatchError(
            f"{f'patch {pid}' if pid else 'a weight patch'} changes {pair[0]!r} and {pair[1]!r}, which share storage "
            "in this model (tied weights): two deltas cannot both be written to one tensor; change only one of them"
        )


def check_module_targets(patch: Patch, model: nn.Module, arch: ArchitectureSpec, wraps: str | None) -> None:
    """Refuse a module-state or memory patch that would wrap a module its method does not wrap."""
    pid, modules = patch.patch_id, patch.metadata.get("modules") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise PatchError(f"patch {pid}: metadata 'modules' must be a list of module paths, not {modules!r}")
    if patch.kind is PatchKind.MEMORY and not modules:
        return
    if wraps is None:
        raise PatchError(
            f"method {patch.method!r} declares no wrapped module role (EditMethod.wraps), so "
            f"kedit cannot check where {patch.kind.value} patch {pid} would wrap {modules}; refused"
        )
    if not modules or len(set(modules)) != len(modules):
        raise PatchError(f"{patch.kind.value} patch {pid} must name each module it wraps once, not {modules}")
    allowed = set(arch.role_paths(model, wraps))
    for path in modules:
        if path not in allowed:
            raise PatchError(
                f"patch {pid} would wrap {path!r}, which is not a {wraps!r} module of this model "
                f"(method {patch.method!r} wraps only those)"
            )
        try:
            get_module(model, path)
        except KeditError:
            raise PatchError(f"patch {pid} would wrap {path!r}, which this model does not have") from None
    owners = {name.rpartition(".")[0] for name in patch.metadata["fingerprints"]}
    if patch.kind is PatchKind.MODULE_STATE and owners != set(modules):
        raise PatchError(
            f"patch {pid} would wrap {sorted(modules)} but fingerprints parameters of "
            f"{sorted(owners)}: a module-state patch wraps exactly the modules it fingerprints"
        )
    unchecked = set(modules) - owners
    if unchecked:
        raise PatchError(f"patch {pid} would wrap {sorted(unchecked)[0]!r} without a fingerprint of its parameters")


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing above each ``|t|`` at the working precision of :meth:`Patch.apply`: the tensor's dtype,
    at most float32 (apply adds in float32), as float64."""
    work = t.dtype if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    info = torch.finfo(work)
    a = t.detach().abs().to(work).double()
    spacing = torch.ldexp(torch.full_like(a, info.eps), torch.frexp(a).exponent - 1)  # |t| = m * 2**e, m in [0.5, 1)
    return torch.where(a < info.smallest_normal, torch.full_like(a, info.smallest_normal * info.eps), spacing)


def revert_error_bound(applied: torch.Tensor, reverted: torch.Tensor, delta: torch.Tensor) -> float:
    """Upper bound on ``max |reverted - pre-edit|`` when ``applied`` is what ``Patch.apply`` wrote for
    ``pre-edit + delta`` and ``reverted`` is ``applied - delta`` rounded to the parameter's dtype.

    Per weight: the rounding of the subtraction, ``|reverted - (applied - delta)|`` measured in float64,
    plus one unit in the last place of ``applied`` and one of ``reverted`` (working precision), which bound
    how far apply's own rounding moved ``applied`` from ``pre-edit + delta``.
    """
    if applied.numel() == 0:
        return 0.0
    w, v = applied.detach().double(), reverted.detach().double()
    measured = (v - (w - delta.to(w.device, torch.float64))).abs()
    return float((measured + ulp(applied) + ulp(reverted)).max())


def describe_revert(exact: bool, bound: float) -> str:
    """The words ``kedit patch revert`` prints and its JSON carries (``summary``)."""
    if exact:
        return "bit-exact (sha256 equals the pre-edit fingerprint)"
    return f"not bit-exact: each weight is within {bound!r} of its pre-edit value (max_abs_error_bound)"
