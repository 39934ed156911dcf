"""MEND's gradient network g (Mitchell et al. 2022a, Sec. 3.1-3.2).

For each edited weight ``W_ℓ`` with rank-one gradient terms ``(u_t, δ_t)``:

    (ũ_t, δ̃_t) = g_ℓ( [ norm(u_t) ; norm(δ_t) ] )                          (eq. 3)
    Δ_ℓ = -η_ℓ Σ_t δ̃_t ũ_tᵀ                                                  (the edit)

``norm`` standardizes every dimension with running statistics of the training gradients (frozen
after training). ``g`` is an MLP of low-rank residual layers
``h ← h + relu((U V h + b) ⊙ s_ℓ + o_ℓ)`` whose ``U`` starts at zero (g = identity at
initialization); one network is shared by all weights of the same shape, with a per-layer scale
``s_ℓ`` and shift ``o_ℓ``. ``η_ℓ`` is a learned step size per layer (``log η_ℓ`` is the parameter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .forward import LowRankUpdate
from .gradient_factors import GradientFactors


class RunningNorm(nn.Module):
    """Per-dimension mean/std of everything seen by :meth:`update` (Chan et al.'s parallel Welford).

    The statistics are parameters without gradient so that the trainer checkpoints them.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.count = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.m2 = nn.Parameter(torch.zeros(dim), requires_grad=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.to(self.mean.dtype)
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = float(self.count)
        n = n_a + n_b
        diff = mean_b - self.mean
        self.mean.add_(diff * (n_b / n))
        self.m2.add_(m2_b + diff**2 * (n_a * n_b / n))
        self.count.fill_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:  # no statistics yet (an untrained editor): identity
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean) / (std + 1e-6)


class LowRankResidual(nn.Module):
    """``h + relu((U V h + b) ⊙ scale[mode] + shift[mode])``; ``U = 0`` at init (identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.V.T) @ self.U.T + self.bias
        return h + torch.relu(pre * self.scale[mode] + self.shift[mode])


class GradientMLP(nn.Module):
    """g for one weight shape: ``n_layers`` low-rank residual layers over ``[u ; δ]``."""

    def __init__(self, dim: int, rank: int, n_layers: int, n_modes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, n_modes, generator) for _ in range(n_layers)])

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class MENDNetwork(nn.Module):
    """The editor: one :class:`GradientMLP` per weight shape, a normalizer and a step size per weight."""

    kind = "mend"

    def __init__(
        self,
        params: list[str],
        shapes: dict[str, list[int]],
        rank: int = 64,
        n_layers: int = 2,
        edit_lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.params = list(params)
        self.shapes = {p: (int(shapes[p][0]), int(shapes[p][1])) for p in self.params}  # [out, in]
        self.rank, self.n_layers, self.edit_lr, self.seed = rank, n_layers, edit_lr, seed
        gen = torch.Generator().manual_seed(seed)
        keys = sorted({shape_key(s) for s in self.shapes.values()})
        self.mode = {p: [q for q in self.params if self.shapes[q] == self.shapes[p]].index(p) for p in self.params}
        n_modes = {k: sum(1 for p in self.params if shape_key(self.shapes[p]) == k) for k in keys}
        self.nets = nn.ModuleDict(
            {k: GradientMLP(sum(int(x) for x in k.split("x")), rank, n_layers, n_modes[k], gen) for k in keys}
        )
        self.u_norm = nn.ModuleList([RunningNorm(self.shapes[p][1]) for p in self.params])
        self.delta_norm = nn.ModuleList([RunningNorm(self.shapes[p][0]) for p in self.params])
        self.log_lr = nn.Parameter(torch.full((len(self.params),), math.log(edit_lr)))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": self.params,
            "shapes": {p: list(s) for p, s in self.shapes.items()},
            "rank": self.rank,
            "n_layers": self.n_layers,
            "edit_lr": self.edit_lr,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MENDNetwork:
        return cls(
            config["params"], config["shapes"], config["rank"], config["n_layers"], config["edit_lr"], config["seed"]
        )

    def updates(
        self, factors: dict[str, GradientFactors], update_stats: bool = False, **_: Any
    ) -> dict[str, LowRankUpdate]:
        """``Δ_ℓ = -η_ℓ Σ_t δ̃_t ũ_tᵀ`` per weight, as low-rank factors ``a = -η_ℓ δ̃ᵀ``, ``b = ũ``."""
        out: dict[str, LowRankUpdate] = {}
        for i, p in enumerate(self.params):
            f = factors[p]
            if update_stats:
                self.u_norm[i].update(f.u)
                self.delta_norm[i].update(f.delta)
            n_in = self.shapes[p][1]
            h = torch.cat([self.u_norm[i](f.u), self.delta_norm[i](f.delta)], dim=-1)
            h = self.nets[shape_key(self.shapes[p])](h, self.mode[p])
            u_t, d_t = h[:, :n_in], h[:, n_in:]
            out[p] = LowRankUpdate(-self.log_lr[i].exp() * d_t.T, u_t, f.owner)
        return out
