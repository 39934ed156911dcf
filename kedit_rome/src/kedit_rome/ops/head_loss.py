"""Target NLL and essence KL through the output layer in one pass over its weight.

For a hidden state ``h`` and the output embedding ``W`` (``V x H``; logits ``l = cap(W h + b)``
with Gemma's optional soft-capping ``cap(z) = c tanh(z / c)``)::

    nll(h, t)   = lse(l) - l_t                                 grad = E_p[cap' W] - cap'_t W_t
    KL(r || p)  = sum_v r_v log r_v - sum_v r_v l_v + lse(l)    grad = E_p[cap' W] - E_r[cap' W]

with ``p = softmax(l)`` and ``E_p[x] = sum_v p_v x_v``. Both the value and the gradient need a pass
over the whole vocabulary (262k rows on Gemma). Autograd makes two such passes (the logits
forward, then ``dL/dl @ W`` backward) and keeps ``[rows, V]`` logits alive in between; here the
vocabulary is visited once, in chunks, with an online log-sum-exp (as in flash attention): per
chunk ``z = h W_c^T``, and ``E_p[cap' W]`` is accumulated with the running maximum rescaled. The
gradient is stored in the forward and scaled by the incoming gradient in the backward. The
output layer's weight never receives a gradient here (it is frozen while editing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_core.ops.logits import head_weights

CHUNK = 8192


def _capped(z: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and their derivative w.r.t. ``z`` (``None``: identity)."""
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return cap * t, 1 - t * t


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        cap: float | None,
        targets: torch.Tensor,
        ref: torch.Tensor | None,
        ref_rows: torch.Tensor | None,
        record: bool,
        chunk: int,
        top: torch.Tensor | None,
    ) -> torch.Tensor:
        hf = h.detach().float()
        n, dim = hf.shape
        kl = targets < 0
        kl_idx = kl.nonzero()[:, 0]
        use_ref = ref is not None and len(kl_idx) > 0 and not record
        m = torch.full((n,), -torch.inf, device=hf.device)
        z_sum = torch.zeros(n, device=hf.device)
        e_p = torch.zeros(n, dim, device=hf.device)  # running sum_v exp(l_v - m) cap'_v W_v
        e_r = torch.zeros(len(kl_idx), dim, device=hf.device)  # sum_v r_v cap'_v W_v (KL rows)
        r_l = torch.zeros(len(kl_idx), device=hf.device)  # sum_v r_v (log r_v - l_v) (KL rows)
        for lo in range(0, weight.shape[0], chunk):
            w = weight[lo : lo + chunk].to(hf.device, torch.float32)  # an offloaded weight lives elsewhere
            z = hf @ w.T
            if bias is not None:
                z = z + bias[lo : lo + chunk].to(hf.device, torch.float32)
            logits, slope = _capped(z, cap)
            m_new = torch.maximum(m, logits.max(1).values)
            rescale = torch.exp(m - m_new)
            p = torch.exp(logits - m_new[:, None])
            z_sum = z_sum * rescale + p.sum(1)
            e_p = e_p * rescale[:, None] + (p if slope is None else p * slope) @ w
            m = m_new
            if record and len(kl_idx):
                ref[ref_rows, lo : lo + chunk] = logits[kl_idx].to(ref.dtype)
            elif use_ref:
                log_r = ref[ref_rows, lo : lo + chunk].float()
                r = log_r.exp()
                r_l = r_l + (r * (log_r - logits[kl_idx])).sum(1)
                e_r = e_r + (r if slope is None else r * slope[kl_idx]) @ w
        lse = m + torch.log(z_sum)
        grad = e_p / z_sum[:, None]
        loss = torch.zeros(n, device=hf.device)
        rows = (~kl).nonzero()[:, 0]
        if len(rows):
            at = targets[rows].to(weight.device)
            w_t = weight[at].to(hf.device, torch.float32)
            z_t = (hf[rows] * w_t).sum(1)
            if bias is not None:
                z_t = z_t + bias[at].to(hf.device, torch.float32)
            l_t, s_t = _capped(z_t, cap)
            loss[rows] = lse[rows] - l_t
            if top is not None:  # the target is the most probable token (its logit is the running max)
                top[rows] = l_t >= m[rows] - 1e-4  # (a tie within rounding counts)
            grad[rows] = grad[rows] - (w_t if s_t is None else s_t[:, None] * w_t)
        if len(kl_idx):
            if use_ref:
                loss[kl_idx] = r_l + lse[kl_idx]
                grad[kl_idx] = grad[kl_idx] - e_r
            else:
                loss[kl_idx] = 0.0
                grad[kl_idx] = 0.0
                if record:
                    ref[ref_rows] -= lse[kl_idx, None].to(ref.dtype)
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return (grad_out[:, None] * grad).to(ctx.h_dtype), *([None] * 9)


def head_parts(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """The output layer's weight ``[V, H]``, bias and logit soft-cap (``None`` where absent); weight and
    bias as values, read where they live (:func:`~kedit_core.ops.logits.head_weights`)."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return (*head_weights(model), cap)


def head_loss(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ref: torch.Tensor | None = None,
    ref_rows: torch.Tensor | None = None,
    record: bool = False,
    chunk: int = CHUNK,
    top: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row ``i`` of ``hidden`` ``[n, H]``: ``-log P(targets[i] | hidden[i])``, or, for the rows
    with ``targets[i] < 0`` (the j-th such row), ``KL(exp(ref[ref_rows[j]]) || P(. | hidden[i]))``
    with ``ref`` a ``[R, V]`` buffer of reference log-probabilities (``ref_rows`` defaults to
    ``0..``). ``record=True``: the KL rows give zero (with zero gradient, as at the reference point)
    and their log-probabilities are written into ``ref[ref_rows]``. ``top`` (bool ``[n]``, optional) is
    set, at the target rows, to whether the target is the most probable token. Differentiable w.r.t.
    ``hidden`` only; one pass over the output embedding."""
    weight, bias, cap = head_parts(model)
    n_kl = int((targets < 0).sum())
    if ref is not None and ref_rows is None:
        ref_rows = torch.arange(n_kl, device=ref.device)
    if record and ref is None:
        raise ValueError("record=True needs a reference buffer to write into")
    return _HeadLoss.apply(
        hidden,
        weight.detach(),
        None if bias is None else bias.detach(),
        cap,
        targets.to(hidden.device),
        ref,
        ref_rows,
        record,
        chunk,
        top,
    )
