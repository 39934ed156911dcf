"""Shared helpers of the kedit_grace tests."""

from __future__ import annotations

import torch

from kedit_core.ops.tokens import encode_pairs
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_requests

TINY_HPARAMS = {
    "grace": {"layer": 2, "eps_init": 0.01, "lr": 0.5, "max_steps": 8, "stop_loss": 0.0},
    "melo": {
        "router_layer": 2,
        "lora_layers": [2, 3],
        "lr": 0.05,
        "max_steps": 8,
        "radius": 0.03,
        "cluster_radius": 0.0,
        "stop_loss": 0.0,
    },
    # the tiny models' activations are ~100x smaller than a real model's: margins scaled down
    "wise": {
        "layer": 2,
        "optimizer": "adam",
        "lr": 0.05,
        "max_steps": 60,
        "alpha": 0.02,
        "beta": 0.2,
        "gamma": 0.1,
        "mask_ratio": 0.5,
        "stop_loss": 0.0,
    },
}


def three_requests() -> list[EditRequest]:
    extra = EditRequest(
        prompt="Lionel Messi plays football for",
        subject="Lionel Messi",
        target_new="Japan",
        ground_truth="Argentina",
        locality=({"prompt": "Mount Fuji is the highest mountain in", "target": "Japan"},),
    )
    return [*tiny_requests(), extra]


def probe_pairs() -> list[tuple[str, str]]:
    pairs = []
    for r in three_requests():
        pairs.append((r.prompt, r.target_new))
        pairs.extend((p.prompt, p.target) for p in r.locality)
    return pairs


def logits(model, tok, pairs=None):
    pairs = pairs or probe_pairs()
    enc = encode_pairs(tok, [p for p, _ in pairs], [t for _, t in pairs])
    with torch.no_grad():
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits


#: prompts no edit is about: the tiny models must give them bit-identical logits after editing
UNRELATED = [("Berlin is the capital of", "Germany"), ("Apple was founded in California by", "Steve Jobs")]


def generation_calls(model, tok, module, prompt: str, max_new_tokens: int) -> list[tuple]:
    """(input, output) of ``module`` at every forward of a greedy ``generate`` from ``prompt``."""
    import torch

    from kedit_core.ops.tokens import encode_prompts

    ids, mask, _ = encode_prompts(tok, [prompt])
    calls: list[tuple] = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append((a[0].detach(), o.detach())))
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    finally:
        handle.remove()
    return calls
