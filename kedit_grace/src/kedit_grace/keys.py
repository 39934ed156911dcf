"""The key of an edit: what enters a module at the edit prompt's last token.

GRACE keys its codebook on the wrapped layer's input (Hartvigsen et al. 2023, Sec. 3); MELO keys
its index on the input of the router layer's attention (Yu et al. 2024, Sec. 3.2). Either way the
forward ends at that module (:func:`kedit_core.ops.hooks.stop_before`): the module itself -- possibly
an installed wrapper -- and everything above it never run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_core.ops.hooks import stop_before
from kedit_core.ops.logits import final_hidden, model_device
from kedit_core.ops.tokens import encode_prompts


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
