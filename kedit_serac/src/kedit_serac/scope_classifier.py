"""SERAC's scope classifier g_φ(z_e, x): is input x in the scope of the stored edit z_e?

Embedding-based form (Mitchell et al. 2022b, Sec. 3): both sides go through the (frozen) sentence
encoder e(·) and a trained projection W, and

    g_φ(z_e, x) = σ( s · cos(W e(z_e), W e(x)) + b )

with φ = (W, s, b). An input is routed to the counterfactual model with the edit of the highest
g_φ when that probability exceeds ``threshold``.
"""

from __future__ import annotations

import torch
from torch import nn

STATE_KEYS = ("proj", "scale", "bias")


class ScopeClassifier(nn.Module):
    def __init__(self, dim: int, init_scale: float = 10.0, init_bias: float = -7.0) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.eye(dim))
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(emb @ self.proj.T, dim=-1)

    def logits(self, edit_emb: torch.Tensor, query_emb: torch.Tensor) -> torch.Tensor:
        """``[Q, E]`` logits of g_φ for every (query, edit) pair."""
        return self.scale * self.project(query_emb) @ self.project(edit_emb).T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            k: getattr(self, k).detach().clone().float().reshape(-1 if k != "proj" else self.proj.shape)
            for k in STATE_KEYS
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ScopeClassifier:
        proj = tensors["proj"]
        clf = cls(proj.shape[1])
        with torch.no_grad():
            clf.proj.copy_(proj)
            clf.scale.copy_(tensors["scale"].reshape(()))
            clf.bias.copy_(tensors["bias"].reshape(()))
        clf.requires_grad_(False)
        return clf.eval()
