"""Spreading a residual-stream change over MEMIT's critical layers, through Gemma's MLP-output norm.

MEMIT (Meng et al. 2023, Eq. 16-19) wants the hidden state ``h_L`` at the subject's last token of
the last critical layer ``L`` to become ``z``. It visits the critical layers ``l_1 < ... < l_m = L``
in order; at layer ``l`` it asks the MLP to add ``r_l = (z - h_L) / (m - i)`` -- an equal share of
what is still missing -- to the residual stream, assuming the MLP output is added to it unchanged.

Gemma 2/3 do not add it unchanged: the residual receives ``N(m) = g * m / rms(m)`` with
``N = post_feedforward_layernorm`` (``ArchitectureSpec.post_mlp_norm``). Feeding ``r_l`` to the
least-squares update as if it were an MLP-output change is what broke EasyEdit's MEMIT on Gemma 3.
Here ``r_l`` is mapped back through the norm: the MLP
output ``m'`` with ``N(m') = N(m) + r_l`` is, because an RMS norm is scale invariant,
``m' = s * y / g`` with ``y = N(m) + r_l`` and any ``s > 0``; we take the ``s`` that keeps the
size of the MLP output (``rms(m') = rms(m)``, far from the norm's epsilon), and the least-squares
residual is ``m' - m``.
A norm's output has a fixed size (``rms(N(x) / g) = 1``), so ``N(m') = y / rms(y / g)``: exactly
``y`` when ``y`` is reachable, else its direction. What one layer cannot add stays in
``z - h_L`` and is shared among the layers after it, which MEMIT re-measures at every layer.
The gain ``g`` is read off the module itself as ``N(1)`` (an all-ones input has rms 1), so no
weight convention (``w`` vs ``1 + w``) is assumed; a norm that is not of the RMS type is refused.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_gain(norm: nn.Module, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The elementwise gain ``g`` of an RMS-type norm, checked on a random vector."""
    with torch.no_grad():
        g = norm(torch.ones(1, dim, device=device, dtype=dtype))[0].double()
        x = torch.randn(1, dim, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
        expect = g * x[0].double() / x[0].double().pow(2).mean().sqrt()
        got = norm(x)[0].double()
    if not torch.allclose(got, expect, rtol=1e-3, atol=1e-4 * float(expect.abs().max())):
        raise ValueError(
            f"{type(norm).__name__} is not an RMS norm; MLP-output residuals cannot be inverted through it"
        )
    return g


def residual_to_mlp_output(norm: nn.Module | None, m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The MLP-output change ``m' - m`` [n, d] that adds ``r`` [n, d] to the residual stream."""
    if norm is None:
        return r
    g = norm_gain(norm, m.shape[-1], m.device, m.dtype)
    md = m.double()
    with torch.no_grad():
        y = norm(m).double() + r.double()
    g = torch.where(g.abs() < 1e-6, torch.full_like(g, 1e-6), g)
    direction = y / g
    s = md.pow(2).mean(-1, keepdim=True).sqrt() / direction.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    return (s * direction - md).to(m.dtype)


def share(remaining: torch.Tensor, layers_left: int) -> torch.Tensor:
    """MEMIT's equal share of the missing residual for this layer (Eq. 19)."""
    return remaining / layers_left


def mlp_output_effect(norm: nn.Module | None, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What changing the MLP output from ``m`` to ``m + delta`` adds to the residual stream:
    ``N(m + delta) - N(m)``, or ``delta`` where the MLP output is added unchanged."""
    if norm is None:
        return delta
    with torch.no_grad():
        return norm(m + delta) - norm(m)
