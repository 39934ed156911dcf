"""Does the model stay a model? Two measures of what edits did to everything they were not about.

*Perplexity on a held-out text*: the model's mean next-token loss on a text it was not edited on, read
in fixed-length, non-overlapping windows (each opened by the tokenizer's BOS token where it has one, so
every token of the text is predicted exactly once). kedit-core ships such a text
(:func:`heldout_text`: written for the project, not drawn from any data set or statistics corpus).

*Unchanged answers*: the unedited model's greedy answers to prompts unrelated to the edits, recorded
once (:func:`greedy_answers`), against the edited model's; :func:`unchanged_share` is the share whose
answer span (:func:`~kedit_core.evaluate.answers.same_answer`) did not change.

Neither changes the model. Logits are computed a few positions at a time: the output layer of a
262k-token vocabulary over a whole window would hold gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..ops.logits import final_hidden, head_logits, model_device
from ..ops.tokens import pad_right
from .answers import same_answer
from .generation import greedy_continuations

HELDOUT_FILE = "heldout_text.txt"


def heldout_text() -> str:
    """The held-out English prose shipped with kedit-core (``kedit_core/data/heldout_text.txt``)."""
    return (resources.files("kedit_core") / "data" / HELDOUT_FILE).read_text(encoding="utf-8")


@dataclass(frozen=True)
class TextScore:
    """A model's loss on a text: ``tokens`` predicted tokens, their mean negative log-likelihood (nats)."""

    tokens: int
    mean_nll: float
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def text_windows(tokenizer: Any, text: str, window: int) -> list[list[int]]:
    """The text's tokens (no special tokens) cut into windows of at most ``window`` positions, each
    opened by BOS where the tokenizer has one (then it holds ``window - 1`` of the text's tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    size = window - 1 if bos is not None else window
    if size < 1:
        raise ValueError(f"window {window} leaves no room for the text's tokens")
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    return [([bos] + c if bos is not None else c) for c in chunks if len(c) > (0 if bos is not None else 1)]


@torch.no_grad()
def text_score(
    model: nn.Module, tokenizer: Any, text: str, *, window: int = 256, batch_size: int = 4, head_chunk: int = 64
) -> TextScore:
    """Mean next-token loss of ``model`` on ``text`` in windows of ``window`` positions (:func:`text_windows`),
    ``batch_size`` windows per forward, the output layer applied to ``head_chunk`` positions at a time."""
    windows = text_windows(tokenizer, text, window)
    if not windows:
        raise ValueError("the text has no tokens to predict")
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for lo in range(0, len(windows), batch_size):
        batch = windows[lo : lo + batch_size]
        ids, mask = pad_right(batch, pad)
        hidden = final_hidden(model, ids.to(device), mask.to(device))
        # position t predicts token t + 1, for every real token but the window's last
        rows = torch.cat([torch.full((len(w) - 1,), r) for r, w in enumerate(batch)])
        cols = torch.cat([torch.arange(len(w) - 1) for w in batch])
        targets = ids[rows, cols + 1]
        for k in range(0, len(rows), head_chunk):
            r, c = rows[k : k + head_chunk].to(hidden.device), cols[k : k + head_chunk].to(hidden.device)
            logp = torch.log_softmax(head_logits(model, hidden[r, c]).float(), dim=-1)
            total -= logp.gather(1, targets[k : k + head_chunk, None].to(logp.device)).sum().item()
        count += len(rows)
    return TextScore(tokens=count, mean_nll=total / count, windows=len(windows))


def perplexity(model: nn.Module, tokenizer: Any, text: str, *, window: int = 256, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``text`` (:func:`text_score`)."""
    return text_score(model, tokenizer, text, window=window, batch_size=batch_size).perplexity


def greedy_answers(
    model: nn.Module, tokenizer: Any, prompts: list[str], budgets: list[int] | int = 12, batch_size: int = 32
) -> list[str]:
    """Greedy continuations of ``prompts``, each stopped at its answer's natural end or its token budget
    (the generation protocol's stopping rule), as text."""
    if isinstance(budgets, int):
        budgets = [budgets] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    conts = greedy_continuations(model, tokenizer, prompts, budgets, stop_at_answer=True, batch_size=batch_size)
    return [c.text for c in conts]


def unchanged_share(before: list[str], after: list[str]) -> float:
    """The share of prompts whose answer span ``after`` (an edited model's continuations) is the one
    ``before`` (the unedited model's, same order); 1.0 for no prompts."""
    if len(before) != len(after):
        raise ValueError(f"{len(after)} answers to compare with {len(before)}")
    if not before:
        return 1.0
    return sum(same_answer(a, b) for a, b in zip(after, before, strict=True)) / len(before)
