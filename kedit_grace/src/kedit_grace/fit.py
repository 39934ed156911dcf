"""Fitting edit parameters so the model emits the targets (GRACE's values, MELO's LoRA blocks, WISE's
side memory).

    min_theta  - sum_j log p_theta(y_j | x, y_<j)  [+ R(theta)]     (teacher forcing over " " + target)

optimized with Adam (or SGD) until every target token is the argmax, the mean loss is below
``stop_loss`` and the regularizer ``R`` (WISE's routing margins) is zero -- or ``max_steps``. Logits are computed only at target positions, and the layers
below ``first_layer`` run once (:func:`kedit_core.ops.prefix.cached_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.ops.logits import logits_at, model_device
from kedit_core.ops.prefix import cached_prefix
from kedit_core.ops.tokens import encode_pairs


@dataclass
class FitResult:
    steps: int
    loss: float
    accuracy: float
    #: the regularizer's value at the last step (0 without one)
    regularizer: float = 0.0


def fit_targets(
    model: nn.Module,
    tokenizer: object,
    arch: ArchitectureSpec,
    prompts: list[str],
    targets: list[str],
    params: list[torch.Tensor],
    *,
    first_layer: int,
    lr: float,
    max_steps: int,
    stop_loss: float,
    regularizer: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
) -> FitResult:
    """Optimize ``params`` (leaf tensors with ``requires_grad``) in place; the model's own
    parameters get no gradients. ``regularizer`` adds a term to the loss (it must reach zero before
    the fit stops early); ``after_step`` runs after each optimizer step (a projection)."""
    device = model_device(model)
    enc = encode_pairs(tokenizer, prompts, targets, device)
    rows, cols = enc.target_positions()
    flat = enc.flat_targets().to(device)
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    loss_value, acc, step, reg_value = float("inf"), 0.0, 0, 0.0
    with cached_prefix(model, arch, first_layer, enc.input_ids, enc.attention_mask), torch.enable_grad():
        for step in range(max_steps + 1):
            logits = logits_at(model, enc.input_ids, enc.attention_mask, rows, cols).float()
            loss = torch.nn.functional.cross_entropy(logits, flat)
            loss_value = float(loss.detach())
            acc = float((logits.detach().argmax(-1) == flat).float().mean())
            reg_value = 0.0
            if regularizer is not None:
                reg = regularizer()
                reg_value = float(reg.detach())
                loss = loss + reg
            if (acc == 1.0 and loss_value < stop_loss and reg_value <= 0.0) or step == max_steps:
                break
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
    for p in params:
        p.grad = None
    return FitResult(step, loss_value, acc, reg_value)
