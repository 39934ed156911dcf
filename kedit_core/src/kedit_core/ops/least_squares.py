"""Closed-form weight updates of a linear associative memory ``W`` (keys in, values out).

Rank one (ROME Eq. 2, with the same key ``k*`` in the value and the update -- the R-ROME fix)::

    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)

so that ``W' k* = v*`` while keys uncorrelated with ``k*`` under ``C`` keep their values.
Batched (MEMIT Eq. 14), for keys ``K [d_in, n]`` and residuals ``R [d_out, n]``::

    Delta = R K^T (lambda C + K K^T)^-1

All updates are returned in ``[out, in]`` orientation; solves run in float64.
"""

from __future__ import annotations

import torch


def rank_one_update(second_moment: torch.Tensor, key: torch.Tensor, residual: torch.Tensor,
                    damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(a [d_out, 1], b [1, d_in])`` of the rank-one update, ``Delta = a @ b``.

    ``residual = v* - W k*``. ``damping`` adds ``damping * mean(diag C) * I`` to ``C`` before the solve.
    """
    c = second_moment.double()
    if damping:
        c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    k = key.double().reshape(-1)
    u = torch.linalg.solve(c, k)                 # C^-1 k*
    b = (u / torch.dot(u, k)).reshape(1, -1)     # (C^-1 k*)^T / ((C^-1 k*)^T k*)
    a = residual.double().reshape(-1, 1)
    return a.to(key.dtype), b.to(key.dtype)


def batched_least_squares(second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor,
                          weight: float) -> torch.Tensor:
    """``Delta [d_out, d_in] = R K^T (weight * C + K K^T)^-1`` for ``keys [d_in, n]``, ``residuals [d_out, n]``."""
    c = second_moment.double()
    k = keys.double()
    adj = torch.linalg.solve(weight * c + k @ k.T, k)   # (lambda C + K K^T)^-1 K, symmetric system
    return (residuals.double() @ adj.T).to(keys.dtype)
