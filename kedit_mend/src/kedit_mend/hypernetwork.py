"""KE's hyper-network (De Cao et al. 2021, "Editing Factual Knowledge in Language Models", Sec. 3).

The edit ``(x, a)`` -- prompt and new target -- is read by a bidirectional LSTM over the model's own
(frozen) token embeddings; its final states give a condition vector ``c``. For each edited weight
``W`` (``[out, in]``) a feed-forward head maps ``c`` to ``α_r, β_r ∈ R^out``, ``α_c, β_c ∈ R^in`` and
``η ∈ R``, and the gradient of the edit loss becomes the update

    α̂ = out · softmax(α_r) α_cᵀ,   β̂ = out · softmax(β_r) β_cᵀ
    Δ = -s · σ(η) · (α̂ ⊙ ∇_W L + β̂)                                        (KE eq. 4-5)

a gated, rank-one-rescaled gradient step: ``σ(η) ≤ 1`` bounds its size (the paper's "constrained"
update, together with the KL constraint of training). ``s`` is a learned scale per weight. Since
``∇_W L = Σ_t δ_t u_tᵀ``, ``α̂ ⊙ ∇_W L = Σ_t (α̃_r ⊙ δ_t)(α_c ⊙ u_t)ᵀ`` stays low-rank, and so is Δ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .forward import LowRankUpdate
from .gradient_factors import GradientFactors


class EditConditioner(nn.Module):
    """``c = tanh(W [h→_T ; h←_1])`` of a BiLSTM over the edit's token embeddings."""

    def __init__(self, embed_dim: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, cond_dim)

    def forward(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([e.shape[0] for e in embeds])
        padded = nn.utils.rnn.pad_sequence([F.layer_norm(e, e.shape[-1:]) for e in embeds], batch_first=True)
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: [2, B, hidden]
        return torch.tanh(self.proj(torch.cat([h[0], h[1]], dim=-1)))


class ConditionedParameter(nn.Module):
    """The head for one weight: ``c -> (α_r, α_c, β_r, β_c, η)``."""

    def __init__(self, cond_dim: int, hidden: int, out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.out_dim, self.in_dim = out_dim, in_dim
        self.hidden = nn.Linear(cond_dim, hidden)
        self.head = nn.Linear(hidden, 2 * (out_dim + in_dim) + 1)
        with torch.no_grad():  # start near a plain gradient step: α̂ ≈ 1, β̂ ≈ 0, σ(η) = 1/2
            self.head.weight.mul_(1e-2)
            self.head.bias.zero_()
            self.head.bias[out_dim : out_dim + in_dim] = 1.0

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        o, i = self.out_dim, self.in_dim
        ar, ac, br, bc, eta = self.head(torch.tanh(self.hidden(c))).split([o, i, o, i, 1], dim=-1)
        return o * ar.softmax(-1), ac, o * br.softmax(-1), bc, torch.sigmoid(eta[..., 0])


class KENetwork(nn.Module):
    """The editor: a shared :class:`EditConditioner` and one :class:`ConditionedParameter` per weight."""

    kind = "ke"

    def __init__(
        self,
        params: list[str],
        shapes: dict[str, list[int]],
        embed_dim: int,
        lstm_hidden: int = 128,
        cond_dim: int = 128,
        head_hidden: int = 128,
        edit_lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.params = list(params)
        self.shapes = {p: (int(shapes[p][0]), int(shapes[p][1])) for p in self.params}
        self.cfg = {
            "embed_dim": embed_dim,
            "lstm_hidden": lstm_hidden,
            "cond_dim": cond_dim,
            "head_hidden": head_hidden,
            "edit_lr": edit_lr,
            "seed": seed,
        }
        with torch.random.fork_rng():  # seeded initialization without touching the global RNG
            torch.manual_seed(seed)
            self.conditioner = EditConditioner(embed_dim, lstm_hidden, cond_dim)
            self.heads = nn.ModuleList(
                [ConditionedParameter(cond_dim, head_hidden, *self.shapes[p]) for p in self.params]
            )
        self.log_scale = nn.Parameter(torch.full((len(self.params),), math.log(edit_lr)))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": self.params,
            "shapes": {p: list(s) for p, s in self.shapes.items()},
            **self.cfg,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KENetwork:
        keys = ("embed_dim", "lstm_hidden", "cond_dim", "head_hidden", "edit_lr", "seed")
        return cls(config["params"], config["shapes"], **{k: config[k] for k in keys})

    def updates(
        self, factors: dict[str, GradientFactors], edit_embeds: list[torch.Tensor] | None = None, **_: Any
    ) -> dict[str, LowRankUpdate]:
        """Per weight, ``Δ = -s σ(η) (α̂ ⊙ ∇W + β̂)`` summed over the edits, as low-rank factors."""
        if edit_embeds is None:
            raise ValueError("KE needs the token embeddings of each edit")
        c = self.conditioner(edit_embeds)  # [E, cond]
        n_edits = c.shape[0]
        out: dict[str, LowRankUpdate] = {}
        for i, p in enumerate(self.params):
            f = factors[p]
            ar, ac, br, bc, gate = self.heads[i](c)  # [E, out], [E, in], [E, out], [E, in], [E]
            coef = -self.log_scale[i].exp() * gate  # [E]
            a_grad = (ar[f.owner] * f.delta * coef[f.owner, None]).T  # [out, N]
            b_grad = ac[f.owner] * f.u  # [N, in]
            a = torch.cat([a_grad, (br * coef[:, None]).T], dim=1)
            b = torch.cat([b_grad, bc], dim=0)
            owner = torch.cat([f.owner, torch.arange(n_edits, device=f.owner.device)])
            out[p] = LowRankUpdate(a, b, owner)
        return out
