"""Closed-form weight updates of a linear associative memory ``W`` (keys in, values out).

Rank one (ROME Eq. 2, with the same key ``k*`` in the value and the update -- the R-ROME fix)::

    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)

so that ``W' k* = v*`` while keys uncorrelated with ``k*`` under ``C`` keep their values.
Batched (MEMIT Eq. 14), for keys ``K [d_in, n]`` and residuals ``R [d_out, n]``::

    Delta = R K^T (lambda C + K K^T)^-1

Null-space projected (AlphaEdit, Fang et al. 2025), with ``P`` the projector onto the null space of the
preserved keys (:mod:`.null_space`) and ``K_p`` the keys of earlier edits of a sequential stream::

    Delta = R K^T P (K_p K_p^T P + K K^T P + lambda I)^-1

All updates are returned in ``[out, in]`` orientation; solves run in float64.
"""

from __future__ import annotations

import torch


class Factorization:
    """``C + damping * mean(diag C) * I`` ready to solve with, in float64: its Cholesky factor, or the
    matrix itself (LU at each solve) where it is not positive definite. Computed once per ``C``, it
    serves every rank-one update of that layer (ROME edits one layer many times with the same ``C``)."""

    def __init__(self, second_moment: torch.Tensor, damping: float = 0.0) -> None:
        c = second_moment.double()
        if damping:
            c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        factor, info = torch.linalg.cholesky_ex(c)
        self.use_lu = bool(int(info))
        self.matrix = c if self.use_lu else factor

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """``(C + damping * mean(diag C) * I)^-1 k`` for a float64 vector ``k``."""
        if self.use_lu:
            return torch.linalg.solve(self.matrix, k)
        return torch.cholesky_solve(k[:, None], self.matrix)[:, 0]


def rank_one_update(c: Factorization, key: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(a [d_out, 1], b [1, d_in])`` of the rank-one update, ``Delta = a @ b``.

    ``residual = v* - W k*``; ``c``: the (damped) second moment ``C``, factorized.
    """
    k = key.double().reshape(-1)
    u = c.solve(k)  # C^-1 k*
    b = (u / torch.dot(u, k)).reshape(1, -1)  # (C^-1 k*)^T / ((C^-1 k*)^T k*)
    a = residual.double().reshape(-1, 1)
    return a.to(key.dtype), b.to(key.dtype)


def batched_least_squares(
    second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(R [d_out, n], A^T [n, d_in])`` of ``Delta = R K^T (weight * C + K K^T)^-1``.

    ``keys [d_in, n]``, ``residuals [d_out, n]``; ``A = (weight C + K K^T)^-1 K`` (the system is
    symmetric, so ``K^T (.)^-1 = A^T``). Multiply the factors for the dense update.
    """
    c = second_moment.double()
    k = keys.double()
    adj = torch.linalg.solve(weight * c + k @ k.T, k)
    return residuals.to(keys.dtype), adj.T.to(keys.dtype).contiguous()


def null_space_least_squares(
    projector: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, prior: torch.Tensor | None, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(R [d_out, n], B [n, d_in])`` of AlphaEdit's ``Delta = R K^T P (A P + weight I)^-1`` with
    ``A = K_p K_p^T + K K^T``.

    ``projector``: ``P [d_in, d_in]``; ``keys [d_in, n]``; ``residuals [d_out, n]``; ``prior``: ``K_p K_p^T``
    (None: no earlier edits). It minimizes ``||(W + Delta P) K - V||^2 + ||Delta P K_p||^2 + weight ||Delta P||^2``,
    and ``Delta = Delta P``: keys in the preserved subspace (``P k = 0``) and, as far as the null space allows,
    the earlier edits' keys keep their outputs. ``B^T = (P A + weight I)^-1 P K`` (the transpose of the
    solve: ``A`` and ``P`` are symmetric); it lies in the range of ``P``.
    """
    p = projector.double()
    k = keys.double()
    a = k @ k.T
    if prior is not None:
        a = a + prior.double()
    system = p @ a + weight * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    adj = torch.linalg.solve(system, p @ k)
    return residuals.to(keys.dtype), adj.T.to(keys.dtype).contiguous()
