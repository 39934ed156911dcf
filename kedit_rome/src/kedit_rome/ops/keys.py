"""Keys: the input of an MLP's down-projection at a chosen token (ROME Sec. 3.1, Eq. 3).

ROME and MEMIT treat the MLP down-projection ``W_out`` as a linear associative memory: the key
``k`` is what enters ``W_out`` at the subject's last token, the value is what leaves it. The key
of a fact is averaged over prompts that prefix the sentence with varied context (the context
templates), ``k* = 1/N sum_j k(x_j + p)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_module
from kedit_core.ops.hooks import capture, stop_after
from kedit_core.ops.logits import model_device
from kedit_core.ops.tokens import encode_prompts, subject_last_token


def subject_positions(tokenizer: Any, texts: Sequence[str], subjects: Sequence[str]) -> list[int]:
    """Index of each subject's last token in each text (special tokens included)."""
    return [subject_last_token(tokenizer, t, s) for t, s in zip(texts, subjects, strict=True)]


@torch.no_grad()
def module_inputs_outputs_at(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    positions: Sequence[int],
    module_path: str,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both the input and the output of ``module_path`` at ``positions[i]`` of ``texts[i]``, one pass."""
    device = model_device(model)
    module = get_module(model, module_path)
    ins, outs = [], []
    for lo in range(0, len(texts), batch_size):
        chunk = list(texts[lo : lo + batch_size])
        ids, mask, _ = encode_prompts(tokenizer, chunk, device)
        with capture(module, "input") as i_store, capture(module, "output") as o_store, stop_after(module):
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        idx = torch.tensor(positions[lo : lo + batch_size], device=device)
        rows = torch.arange(len(chunk), device=device)
        ins.append(i_store[0][rows, idx])
        outs.append(o_store[0][rows, idx])
    return torch.cat(ins, 0), torch.cat(outs, 0)


@torch.no_grad()
def module_io_at(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    positions: Sequence[int],
    module_path: str,
    which: str = "input",
    batch_size: int = 32,
) -> torch.Tensor:
    """``[len(texts), d]``: the input or output of ``module_path`` at ``positions[i]`` of ``texts[i]``."""
    device = model_device(model)
    module = get_module(model, module_path)
    rows = []
    for lo in range(0, len(texts), batch_size):
        chunk = list(texts[lo : lo + batch_size])
        ids, mask, _ = encode_prompts(tokenizer, chunk, device)
        with capture(module, which) as store, stop_after(module):
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        acts = store[0]
        idx = torch.tensor(positions[lo : lo + batch_size], device=acts.device)
        rows.append(acts[torch.arange(len(chunk), device=acts.device), idx])
    return torch.cat(rows, 0)


def fill_templates(templates: Sequence[str], prompt: str) -> list[str]:
    """``template.replace("{}", prompt)`` for each template (prompts may contain braces)."""
    return [t.replace("{}", prompt) for t in templates]


def _template_positions(
    tokenizer: Any, prompts: Sequence[str], subjects: Sequence[str], templates: Sequence[str]
) -> tuple[list[str], Any]:
    """Every prompt inside every template, and the subject's last-token position in each text."""
    texts, subs = [], []
    for prompt, subject in zip(prompts, subjects, strict=True):
        texts.extend(fill_templates(templates, prompt))
        subs.extend([subject] * len(templates))
    return texts, subject_positions(tokenizer, texts, subs)


def compute_keys(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    layer: int,
    prompts: Sequence[str],
    subjects: Sequence[str],
    templates: Sequence[str] = ("{}",),
) -> torch.Tensor:
    """``[N, d_in]``: per request, the down-projection input at the subject's last token, averaged
    over the context templates (ROME Eq. 3, ``k* = mean_j k(x_j + p)``)."""
    texts, pos = _template_positions(tokenizer, prompts, subjects, templates)
    keys = module_io_at(model, tokenizer, texts, pos, arch.layer_path(layer, arch.mlp_out), "input")
    return keys.reshape(len(prompts), len(templates), -1).mean(1)


def compute_keys_values(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    layer: int,
    prompts: Sequence[str],
    subjects: Sequence[str],
    templates: Sequence[str] = ("{}",),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Template-averaged keys ``[N, d_in]`` and the down-projection outputs ``[N, d_out]`` with them."""
    texts, pos = _template_positions(tokenizer, prompts, subjects, templates)
    k, v = module_inputs_outputs_at(model, tokenizer, texts, pos, arch.layer_path(layer, arch.mlp_out))
    n, t = len(prompts), len(templates)
    return k.reshape(n, t, -1).mean(1), v.reshape(n, t, -1).mean(1)
