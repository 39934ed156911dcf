"""The null space of the preserved keys, ``P = U_hat U_hat^T`` (AlphaEdit, Fang et al. 2025, Sec. 3).

AlphaEdit edits ``W`` so that the keys ``K_0`` of what the model already knows keep their values: an
update of the form ``Delta P`` with ``P K_0 = 0`` leaves ``(W + Delta P) K_0 = W K_0``. ``P`` projects onto
the null space of ``K_0 K_0^T``, whose (per-token mean) estimate is the key second moment ``C`` that
ROME and MEMIT already use (:mod:`.second_moment`): ``C = U Lambda U^T``; the eigenvectors whose
eigenvalues are below a threshold span the (approximate) null space, ``U_hat``, and ``P = U_hat U_hat^T``.

The threshold is absolute (the paper's 1e-2 on its models' scale) or relative to the mean eigenvalue
``trace(C) / d`` -- the scale of the keys differs between models (:class:`NullSpaceRule`).

:class:`NullSpaces` computes each ``C``'s eigendecomposition once: on disk next to ``C``'s own cache file
(so it is keyed by what ``C`` is keyed by: model fingerprint, layer, corpus, sample size) and ``P`` in
memory, keyed by that file and the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kedit_core.fsutil import atomic_path


@dataclass(frozen=True)
class NullSpaceRule:
    """Which eigenvalues of ``C`` count as zero: below ``threshold``, times the mean eigenvalue if ``relative``."""

    threshold: float
    relative: bool = False

    def cutoff(self, eigenvalues: torch.Tensor) -> float:
        return self.threshold * (float(eigenvalues.mean()) if self.relative else 1.0)


def eigendecomposition(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues [d] float64, ascending; eigenvectors [d, d] float32, one per column)`` of ``C``."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    return values.contiguous(), vectors.float().contiguous()


def null_space_projector(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, rule: NullSpaceRule) -> torch.Tensor:
    """``P = U_hat U_hat^T`` [d, d] float64, ``U_hat`` the eigenvectors whose eigenvalues are below the cutoff."""
    u_hat = eigenvectors[:, eigenvalues < rule.cutoff(eigenvalues)].double()
    return u_hat @ u_hat.T


class NullSpaces:
    """Projectors computed once: the eigendecomposition of each ``C`` on disk (``<C's file>-eigh.safetensors``)
    and ``P`` in memory, keyed by ``C``'s cache file and the :class:`NullSpaceRule`, for as long as this
    object lives."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Path, NullSpaceRule], torch.Tensor] = {}

    @staticmethod
    def eigh_path(second_moment_file: Path) -> Path:
        return second_moment_file.with_name(second_moment_file.stem + "-eigh.safetensors")

    def ready(self, second_moment_file: Path, rule: NullSpaceRule) -> bool:
        """Whether :meth:`projector` can do without ``C`` (``P`` in memory or the eigendecomposition on disk)."""
        return (second_moment_file, rule) in self._memo or self.eigh_path(second_moment_file).is_file()

    def projector(
        self, second_moment_file: Path, rule: NullSpaceRule, second_moment: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``P`` (CPU, float64) of the ``C`` cached in ``second_moment_file``; ``second_moment`` is that ``C``,
        needed only when not :meth:`ready`."""
        key = (second_moment_file, rule)
        if key not in self._memo:
            path = self.eigh_path(second_moment_file)
            if path.is_file():
                stored = load_file(str(path))
                values, vectors = stored["eigenvalues"], stored["eigenvectors"]
            elif second_moment is None:
                raise ValueError(f"no eigendecomposition at {path}: pass the second moment")
            else:
                values, vectors = eigendecomposition(second_moment.cpu())
                with atomic_path(path) as tmp:
                    save_file({"eigenvalues": values, "eigenvectors": vectors}, str(tmp))
            self._memo[key] = null_space_projector(values, vectors, rule)
        return self._memo[key]
