"""The corruption of causal tracing (Meng et al. 2022, Sec. 2.1): Gaussian noise on the subject's
token embeddings, ``x_i* = x_i + eps``, ``eps ~ N(0, nu^2)`` with ``nu = 3 sigma`` and ``sigma`` the
standard deviation of the embeddings over the vocabulary."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_module

#: sigma per embedding module, with the weight's version counter it was measured at
_SIGMA: weakref.WeakKeyDictionary[nn.Module, tuple[int, float]] = weakref.WeakKeyDictionary()


def embedding_std(model: nn.Module, arch: ArchitectureSpec, chunk: int = 16384) -> float:
    """sigma for ``model``, remembered per embedding module until its weight changes."""
    embed = get_module(model, arch.embed)
    version = model.get_input_embeddings().weight._version
    cached = _SIGMA.get(embed)
    if cached is not None and cached[0] == version:
        return cached[1]
    sigma = measure_embedding_std(model, arch, chunk)
    _SIGMA[embed] = (version, sigma)
    return sigma


@torch.no_grad()
def measure_embedding_std(model: nn.Module, arch: ArchitectureSpec, chunk: int = 16384) -> float:
    """sigma: std of the embedding module's *output* over every vocabulary entry.

    The module's output is used, not its weight, so models that scale embeddings inside the module
    (Gemma multiplies by sqrt(hidden)) are measured where the noise is added.
    """
    embed = get_module(model, arch.embed)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    total = torch.zeros((), dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    count = 0
    for lo in range(0, vocab, chunk):
        ids = torch.arange(lo, min(vocab, lo + chunk), device=device)[None]
        out = embed(ids).float()
        total += out.sum(dtype=torch.float64).cpu()
        total_sq += out.square().sum(dtype=torch.float64).cpu()
        count += out.numel()
    mean = total / count
    return float(torch.sqrt(total_sq / count - mean * mean))


def subject_noise(samples: int, n_tokens: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    """``samples`` independent draws of eps for the subject tokens: ``[samples, n_tokens, hidden]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, hidden, generator=gen, dtype=torch.float32) * scale
