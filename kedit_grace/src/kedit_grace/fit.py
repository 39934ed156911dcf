"""Fitting edit parameters so the model emits the targets (GRACE's values, MELO's LoRA blocks).

    min_theta  - sum_j log p_theta(y_j | x, y_<j)          (teacher forcing over " " + target)

optimized with Adam until every target token is the argmax and the mean loss is below
``stop_loss`` (or ``max_steps``). Logits are computed only at target positions, and the layers
below ``first_layer`` run once (:func:`kedit_core.ops.prefix.cached_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
) -> FitResult:
    """Optimize ``params`` (leaf tensors with ``requires_grad``) in place; the model's own
    parameters get no gradients."""
    device = model_device(model)
    enc = encode_pairs(tokenizer, prompts, targets, device)
    rows, cols = enc.target_positions()
    flat = enc.flat_targets().to(device)
    opt = torch.optim.Adam(params, lr=lr)
    loss_value, acc, step = float("inf"), 0.0, 0
    with cached_prefix(model, arch, first_layer, enc.input_ids, enc.attention_mask), torch.enable_grad():
        for step in range(max_steps + 1):
            logits = logits_at(model, enc.input_ids, enc.attention_mask, rows, cols).float()
            loss = torch.nn.functional.cross_entropy(logits, flat)
            loss_value = float(loss.detach())
            acc = float((logits.detach().argmax(-1) == flat).float().mean())
            if (acc == 1.0 and loss_value < stop_loss) or step == max_steps:
                break
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
    for p in params:
        p.grad = None
    return FitResult(step, loss_value, acc)
