"""Tokenizing prompt/target pairs the same way for every method and metric.

A target is scored as the continuation ``prompt + " " + target``: the prompt carries the
tokenizer's special tokens (BOS where the tokenizer adds one), the target never does. The split is
taken from tokenizing the whole string, so tokenizers that add a prefix space (SentencePiece,
LLaMA) and byte-level BPE (GPT-2) give the same target tokens they would in running text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EncodedPairs:
    """A right-padded batch of prompt+target sequences.

    ``input_ids``/``attention_mask``: ``[B, T]``. ``prompt_lens[i]``: tokens of prompt ``i``;
    ``target_ids[i]``: its target tokens, predicted at positions ``prompt_lens[i]-1+j``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: list[int]
    target_ids: list[list[int]]

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the logits that predict each target token, concatenated over the batch."""
        rows, cols = [], []
        for i, (plen, tids) in enumerate(zip(self.prompt_lens, self.target_ids, strict=True)):
            rows.extend([i] * len(tids))
            cols.extend(range(plen - 1, plen - 1 + len(tids)))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)

    def flat_targets(self) -> torch.Tensor:
        return torch.tensor([t for tids in self.target_ids for t in tids], dtype=torch.long)


def split_prompt_target(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (with special tokens) and of ``" " + target`` as it continues it."""
    prompt = prompt.rstrip()
    target = target.strip()
    p_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + target)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and p_ids and p_ids[-1] == eos and full and full[-1] == eos:
        p_ids, full = p_ids[:-1], full[:-1]  # tokenizers that append EOS to every text
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids) :]
    t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    return p_ids, t_ids


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded ``[B, T]`` batch (on the CPU) and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_pairs(tokenizer: Any, prompts: list[str], targets: list[str], device: Any = "cpu") -> EncodedPairs:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs, plens, tids = [], [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p, t = split_prompt_target(tokenizer, prompt, target)
        seqs.append(p + t)
        plens.append(len(p))
        tids.append(t)
    ids, mask = pad_right(seqs, pad)
    return EncodedPairs(ids.to(device), mask.to(device), plens, tids)


def encode_prompts(
    tokenizer: Any, prompts: list[str], device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded prompts (special tokens included); returns ids, mask and each prompt's length."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [tokenizer(p.rstrip())["input_ids"] for p in prompts]
    ids, mask = pad_right(seqs, pad)
    return ids.to(device), mask.to(device), [len(s) for s in seqs]


def subject_last_token(tokenizer: Any, prompt: str, subject: str) -> int:
    """Index (in the prompt's token ids, special tokens included) of the subject's last token."""
    prompt = prompt.rstrip()
    end = prompt.rindex(subject) + len(subject)
    n_prefix = len(tokenizer(prompt[:end])["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and tokenizer(prompt[:end])["input_ids"][-1:] == [eos]:
        n_prefix -= 1
    return n_prefix - 1
