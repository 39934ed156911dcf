"""Greedy continuations for the generation protocol: left-padded batches, each row stopped at its own
natural end (EOS; with ``stop_at_answer``, a newline after the answer has begun or a sentence end) or its
own token budget. Each continuation keeps the special tokens it produced, for the degeneracy check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ..ops.logits import model_device
from .answers import sentence_end


@dataclass
class Continuation:
    """A greedy continuation: its text (special tokens left out), the special/control token ids in it, and
    its text with them shown."""

    text: str
    specials: list[int] = field(default_factory=list)
    shown: str = ""


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special and control tokens, except those that end or pad a continuation."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {i for i, tok in decoder.items() if getattr(tok, "special", False)}
    return ids - {tokenizer.eos_token_id, tokenizer.pad_token_id}


def answer_complete(text: str) -> bool:
    """A newline after the answer has begun, or a finished sentence followed by more text."""
    body = text.lstrip()
    if "\n" in body:
        return True
    end = sentence_end(body)
    return end is not None and end < len(body.rstrip())


class _RowStop(StoppingCriteria):
    """Stops each row at its budget or (``stop_at_answer``) at its answer's natural end; remembers where."""

    def __init__(self, tokenizer: Any, prompt_len: int, budgets: list[int], stop_at_answer: bool) -> None:
        self.tokenizer, self.prompt_len, self.budgets = tokenizer, prompt_len, budgets
        self.stop_at_answer = stop_at_answer
        self.lengths: list[int | None] = [None] * len(budgets)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, budget in enumerate(self.budgets):
            if self.lengths[row] is not None:
                done[row] = True
                continue
            stop = n >= budget
            if not stop and self.stop_at_answer:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len :], skip_special_tokens=True)
                stop = answer_complete(text)
            if stop:
                self.lengths[row] = n
                done[row] = True
        return done


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    budgets: list[int],
    *,
    stop_at_answer: bool,
    batch_size: int = 32,
) -> list[Continuation]:
    """Greedy continuation of each prompt (no target in context), in batches of similar length."""
    specials = special_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Continuation | None] = [None] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            conts = _generate_batch(
                model, tokenizer, [prompts[i] for i in idx], [budgets[i] for i in idx], stop_at_answer, specials
            )
            for i, cont in zip(idx, conts, strict=True):
                out[i] = cont
    finally:
        tokenizer.padding_side = side
    return out  # type: ignore[return-value]


def _generate_batch(
    model: nn.Module, tokenizer: Any, prompts: list[str], budgets: list[int], stop_at_answer: bool, specials: set[int]
) -> list[Continuation]:
    enc = tokenizer([p.rstrip() for p in prompts], return_tensors="pt", padding=True).to(model_device(model))
    prompt_len = enc["input_ids"].shape[1]
    stop = _RowStop(tokenizer, prompt_len, budgets, stop_at_answer)
    gen = model.generate(
        **enc,
        max_new_tokens=max(budgets),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([stop]),
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return _decode_rows(tokenizer, gen[:, prompt_len:], stop.lengths, specials)


def _decode_rows(
    tokenizer: Any, new: torch.Tensor, lengths: list[int | None], specials: set[int]
) -> list[Continuation]:
    """Each row's own tokens: up to where it stopped and before its EOS."""
    eos = tokenizer.eos_token_id
    rows = []
    for row, ids in enumerate(new.tolist()):
        n = lengths[row]
        ids = ids[:n] if n is not None else ids
        if eos in ids:
            ids = ids[: ids.index(eos)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        found = [t for t in ids if t in specials]
        rows.append(Continuation(text, found, tokenizer.decode(ids, skip_special_tokens=False) if found else text))
    return rows
