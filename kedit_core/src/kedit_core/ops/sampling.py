"""Text sampled from the model itself: top-k sampling from short openers, seeded, batched.

ROME's context templates (``kedit_rome.ops.context_templates``) are such samples, and so are the
generic inputs WISE's router learns to leave alone (``kedit_grace.wise``): text in the model's own
distribution, with no data set behind it. :func:`model_samples` caches them on disk per model
fingerprint, since they depend only on the model and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fsutil import atomic_write_text
from ..progress import step
from .logits import head_logits, model_device
from .tokens import encode_prompts

OPENERS = ("The", "Therefore", "Because", "I", "You")


def _batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    return ids, att


def sample_texts(
    model: nn.Module, tokenizer: Any, openers: Sequence[str], length: int, top_k: int, seed: int
) -> list[str]:
    """One continuation of ``length`` tokens per opener (top-``top_k`` sampling, the generator seeded
    with ``seed`` on the CPU), decoded with the opener and without special tokens."""
    device = model_device(model)
    ids, _, lens = encode_prompts(tokenizer, list(openers), device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seqs = [ids[i, : lens[i]].tolist() for i in range(len(openers))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for _ in range(length):
            batch, att = _batch(seqs, pad)
            hidden = model.base_model(input_ids=batch.to(device), attention_mask=att.to(device), use_cache=False)[0]
            last = hidden[torch.arange(len(seqs), device=hidden.device), torch.tensor([len(s) - 1 for s in seqs])]
            top = head_logits(model, last).float().cpu().topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)[:, 0]
            for i, s in enumerate(seqs):
                s.append(int(top.indices[i, choice[i]]))
    return [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


def model_samples(
    model: nn.Module,
    tokenizer: Any,
    model_fingerprint: str,
    cache_dir: Path,
    n: int,
    length: int,
    top_k: int = 40,
    seed: int = 0,
    batch: int = 64,
) -> list[str]:
    """``n`` texts of ``length`` sampled tokens after the :data:`OPENERS` in turn, cached under
    ``<cache_dir>/samples/<model_fingerprint>/``."""
    key = hashlib.sha256(json.dumps([n, length, top_k, seed]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "samples" / model_fingerprint / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    openers = [OPENERS[i % len(OPENERS)] for i in range(n)]
    texts: list[str] = []
    with step(f"sampling {n} texts of {length} tokens from the model", one_time=True):
        for start in range(0, n, batch):
            texts += sample_texts(model, tokenizer, openers[start : start + batch], length, top_k, seed + start)
    atomic_write_text(path, json.dumps(texts, ensure_ascii=False, indent=1))
    return texts
