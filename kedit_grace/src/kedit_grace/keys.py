"""The key of an edit: what enters a module at the edit prompt's last token.

GRACE keys its codebook on the wrapped layer's input (Hartvigsen et al. 2023, Sec. 3); MELO keys
its index on the input of the router layer's attention (Yu et al. 2024, Sec. 3.2). Either way the
forward ends at that module (:func:`kedit_core.ops.hooks.stop_before`): the module itself -- possibly
an installed wrapper -- and everything above it never run.

Both route a hit on a key to the positions that predict the edit's answer: the hit and the next
``answer_span - 1`` positions (:func:`kedit_grace.codebook.route_positions`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_core.ops.hooks import stop_before
from kedit_core.ops.logits import final_hidden, model_device
from kedit_core.ops.tokens import encode_pairs, encode_prompts, split_prompt_target


@torch.no_grad()
def last_token_input(model: nn.Module, tokenizer: Any, module: nn.Module, prompt: str) -> torch.Tensor:
    """``[D]`` (float32): the input of ``module`` at the last token of ``prompt``."""
    ids, mask, lens = encode_prompts(tokenizer, [prompt], model_device(model))
    with stop_before(module) as seen:
        final_hidden(model, ids, mask)
    x = seen[0]
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return x[0, lens[0] - 1].float().clone()


@torch.no_grad()
def sequence_inputs(
    model: nn.Module, tokenizer: Any, module: nn.Module, prompts: list[str], targets: list[str] | None = None
) -> list[torch.Tensor]:
    """``[T_i, D]`` (float32) per prompt: the input of ``module`` at every token of ``prompts[i]``
    (of ``prompts[i] + " " + targets[i]`` when ``targets`` are given), one batched forward."""
    device = model_device(model)
    if targets is None:
        ids, mask, lens = encode_prompts(tokenizer, prompts, device)
    else:
        enc = encode_pairs(tokenizer, prompts, targets, device)
        ids, mask = enc.input_ids, enc.attention_mask
        lens = [int(n) for n in mask.sum(dim=1).tolist()]
    with stop_before(module) as seen:
        final_hidden(model, ids, mask)
    x = seen[0]
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return [x[i, :n].float().clone() for i, n in enumerate(lens)]


def answer_span(tokenizer: Any, prompts: list[str], label: str) -> int:
    """How many positions an edit answers: the tokens of ``" " + label`` after its prompts (the most
    over the prompts, which may split the answer differently), at least one."""
    if not prompts:
        return max(1, len(tokenizer(" " + label.strip(), add_special_tokens=False)["input_ids"]))
    return max(1, *(len(split_prompt_target(tokenizer, p, label)[1]) for p in prompts))
