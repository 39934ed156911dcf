"""The fine-tuning gradient of an edit as a sum of rank-one terms (MEND, Sec. 3.1).

For a linear layer ``z = W u`` applied at every token ``t``, the gradient of the edit loss is

    ∇_W L = Σ_t δ_t u_tᵀ,      δ_t = ∂L/∂z_t   (``[out]``),   u_t the layer input (``[in]``)

so the pair ``(u_t, δ_t)`` of every token is all MEND (and KE) need; the full ``[out, in]`` matrix
is never formed. ``u`` is read with a forward hook on the module, ``δ`` with ``torch.autograd.grad``
on the module's output. The edit loss is each request's mean NLL of its target tokens (teacher
forced, ``" " + target``), summed over the requests: a batch of edits gives the sum of their
gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kedit_core.architecture import get_module
from kedit_core.ops.logits import final_hidden, head_logits
from kedit_core.ops.tokens import EncodedPairs


@dataclass
class GradientFactors:
    """``∇_W L = Σ_k delta[k] ⊗ u[k]`` for one weight; ``owner[k]``: the request of term ``k``."""

    u: torch.Tensor  # [N, in]
    delta: torch.Tensor  # [N, out]
    owner: torch.Tensor  # [N] long

    def dense(self) -> torch.Tensor:
        """The ``[out, in]`` gradient (tests and small models only)."""
        return self.delta.T @ self.u


def module_of(param: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj``."""
    return param.rsplit(".", 1)[0]


@contextlib.contextmanager
def record_io(model: nn.Module, params: list[str]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record (input, output) of the modules owning ``params``; outputs are made differentiable."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # the first edited module: the graph starts here
                out = out.detach().requires_grad_(True)
            seen[name] = (args[0].detach(), out)
            return out

        return hook

    try:
        for p in params:
            handles.append(get_module(model, module_of(p)).register_forward_hook(hook_for(p)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def target_nll(model: nn.Module, hidden: torch.Tensor, enc: EncodedPairs) -> torch.Tensor:
    """Mean NLL of each pair's target tokens, ``[B]``, from final hidden states ``[B, T, H]``."""
    rows, cols = enc.target_positions()
    rows, cols = rows.to(hidden.device), cols.to(hidden.device)
    logp = torch.log_softmax(head_logits(model, hidden[rows, cols]).float(), dim=-1)
    nll = -logp.gather(1, enc.flat_targets().to(hidden.device)[:, None])[:, 0]
    per = torch.zeros(len(enc.target_ids), device=hidden.device).index_add(0, rows, nll)
    counts = torch.tensor([len(t) for t in enc.target_ids], device=hidden.device, dtype=per.dtype)
    return per / counts


def gradient_factors(
    model: nn.Module,
    enc: EncodedPairs,
    params: list[str],
    owners: list[int] | None = None,
    forward: Callable[[], torch.Tensor] | None = None,
    exclude_ids: list[int] | None = None,
) -> dict[str, GradientFactors]:
    """(u_t, δ_t) of every token with a non-zero gradient, per parameter in ``params``.

    ``forward`` computes the final hidden states (default: the whole model on ``enc``); the trainer
    passes a forward that starts from cached hidden states. Tokens in ``exclude_ids`` (e.g. BOS, whose
    hidden states are the same in every input, so an update there reaches every input) give no terms.
    """
    owners = owners if owners is not None else list(range(len(enc.target_ids)))
    with torch.enable_grad(), record_io(model, params) as seen:
        hidden = forward() if forward is not None else final_hidden(model, enc.input_ids, enc.attention_mask)
        loss = target_nll(model, hidden, enc).sum()
        outs = [seen[p][1] for p in params]
        grads = torch.autograd.grad(loss, outs)
    owner_rows = torch.tensor(owners, dtype=torch.long)
    out: dict[str, GradientFactors] = {}
    for p, g in zip(params, grads, strict=False):
        u = seen[p][0]
        keep = (g != 0).any(-1) & enc.attention_mask.to(g.device).bool()  # [B, T]
        if exclude_ids:
            keep &= ~torch.isin(enc.input_ids.to(g.device), torch.tensor(exclude_ids, device=g.device))
        batch_idx = keep.nonzero()[:, 0]
        out[p] = GradientFactors(u[keep].float(), g[keep].float(), owner_rows[batch_idx.cpu()].to(g.device))
    return out
