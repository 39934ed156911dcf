"""MELO's dynamic LoRA (Yu et al. 2024, Sec. 3.1): a bank of low-rank blocks on one layer.

    f(x_t) = W x_t + s * B_b A_b x_t     for the block b the router picked at position t
    f(x_t) = W x_t                       where the router picked none

``A [N_blocks, r, d_in]``, ``B [N_blocks, d_out, r]``. Computed on the module's input and output
features, so the storage layout of ``W`` (``nn.Linear`` or GPT-2's ``Conv1D``) does not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..wrapping import ModuleWrapper
from .router import MeloRouter


class MeloLoRA(ModuleWrapper):
    def __init__(
        self,
        base: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        router: MeloRouter,
        state_id: str = "",
    ) -> None:
        super().__init__(base, state_id)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.scale = scale
        self.router = router
        #: while a block is trained: ``(block, a, b)`` used instead of the stored block
        self.trainable: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trainable is not None and self.trainable[0] == index:
            return self.trainable[1], self.trainable[2]
        return self.lora_a[index], self.lora_b[index]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        active = self.router.active
        if active is None or tuple(active.shape) != tuple(x.shape[:-1]):
            return out
        blocks = [int(b) for b in torch.unique(active) if int(b) >= 0]
        if not blocks:
            return out
        delta = torch.zeros_like(out)
        for b in blocks:
            sel = active == b
            a_mat, b_mat = self.block(b)
            delta[sel] = ((x[sel].to(a_mat.dtype) @ a_mat.T) @ b_mat.T * self.scale).to(out.dtype)
        return out + delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.lora_a.shape[0]}, rank={self.lora_a.shape[1]}"
