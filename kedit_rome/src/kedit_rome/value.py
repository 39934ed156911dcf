"""The value optimization shared by ROME (v*), MEMIT (z) and PMET (attention + FFN residuals).

A free vector ``delta_i`` per request is added to the output of one or more modules ("sites") at
the subject's last token of every prompt of that request, and optimized (ROME Eq. 4)::

    min_delta  mean_j -log P(o* | x_j + p)                          (rewriting, all templates)
             + kl_factor * KL(P(. | s is a) || P'(. | s is a))      (essence)
             + weight_decay * ||delta|| / ||v||^2,    ||delta|| <= clamp * ||v||

with ``v`` the site's original output. Layers below the sites are run once (layer-prefix
caching), logits are computed only at the target positions and the essence prompts' last token,
and a request stops moving once its rewriting NLL is below ``early_stop_nll``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit_core.architecture import ArchitectureSpec, get_module
from kedit_core.ops.keys import fill_templates
from kedit_core.ops.logits import final_hidden, head_logits, model_device
from kedit_core.ops.prefix import cached_prefix
from kedit_core.ops.tokens import encode_pairs, subject_last_token
from kedit_core.request import EditRequest
from pydantic import BaseModel, Field
from torch import nn

log = logging.getLogger(__name__)


class ValueOptions(BaseModel):
    """Knobs of the value optimization (a mixin of the methods' hyperparameters)."""

    v_lr: float = Field(default=0.5, gt=0)
    v_num_grad_steps: int = Field(default=20, ge=1)
    v_weight_decay: float = Field(default=0.5, ge=0)
    clamp_norm_factor: float = Field(default=4.0, gt=0)
    kl_factor: float = Field(default=0.0625, ge=0)
    #: a request stops once its mean rewriting NLL (nats per target token) is below this
    early_stop_nll: float = Field(default=0.05, ge=0)


@dataclass
class Batch:
    """The prompts of the optimization: rewriting rows then one essence row per request."""

    enc: Any
    owner: torch.Tensor      # [rows] request index of each row
    lookup: torch.Tensor     # [rows] subject-last-token position
    n_rewrite: int
    kl_last: torch.Tensor    # [n_requests] last position of each essence row


def build_batch(tokenizer: Any, requests: Sequence[EditRequest], templates: Sequence[str], device: Any) -> Batch:
    prompts, targets, subjects, owner = [], [], [], []
    for i, r in enumerate(requests):
        for text in fill_templates(templates, r.prompt):
            prompts.append(text)
            targets.append(r.target_new)
            subjects.append(r.subject)
            owner.append(i)
    n_rewrite = len(prompts)
    for i, r in enumerate(requests):
        prompts.append(f"{r.subject} is a")
        subjects.append(r.subject)
        owner.append(i)
    # essence rows carry a dummy target so one encoding serves both; their target is never scored
    enc = encode_pairs(tokenizer, prompts, targets + ["."] * len(requests), device)
    lookup = [subject_last_token(tokenizer, p, s) for p, s in zip(prompts, subjects, strict=True)]
    kl_last = [enc.prompt_lens[n_rewrite + i] - 1 for i in range(len(requests))]
    return Batch(enc, torch.tensor(owner, device=device), torch.tensor(lookup, device=device), n_rewrite,
                 torch.tensor(kl_last, device=device))


@contextlib.contextmanager
def add_at_lookup(module: nn.Module, batch: Batch, delta: torch.Tensor, seen: list[torch.Tensor]) -> Iterator[None]:
    """Add ``delta[owner[row]]`` to ``module``'s output at each row's lookup position."""
    rows = torch.arange(len(batch.owner), device=batch.owner.device)

    def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        if not seen:
            seen.append(out[rows, batch.lookup].detach().clone())
        add = torch.zeros_like(out)
        add = add.index_put((rows, batch.lookup), delta[batch.owner].to(out.dtype))
        new = out + add
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ValueResult:
    deltas: list[torch.Tensor]   # per site, [n_requests, d]
    initial: list[torch.Tensor]  # per site, [n_requests, d]: the original site output, bare prompt
    steps: int
    nll: list[float]


def optimize_values_chunked(model: nn.Module, tokenizer: Any, arch: ArchitectureSpec, requests: Sequence[EditRequest],
                            templates: Sequence[str], sites: Sequence[str], prefix_layers: int, opts: ValueOptions,
                            chunk: int) -> ValueResult:
    """:func:`optimize_values` over groups of ``chunk`` requests (they are independent): memory
    for activations stays that of one group however large the batch of edits."""
    parts = [optimize_values(model, tokenizer, arch, requests[i : i + chunk], templates, sites, prefix_layers, opts)
             for i in range(0, len(requests), chunk)]
    return ValueResult(
        [torch.cat([p.deltas[s] for p in parts]) for s in range(len(sites))],
        [torch.cat([p.initial[s] for p in parts]) for s in range(len(sites))],
        max(p.steps for p in parts),
        [x for p in parts for x in p.nll],
    )


def optimize_values(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    sites: Sequence[str],
    prefix_layers: int,
    opts: ValueOptions,
) -> ValueResult:
    """Optimize one delta per request per site; see the module docstring for the objective."""
    device = model_device(model)
    batch = build_batch(tokenizer, requests, templates, device)
    enc, n = batch.enc, len(requests)
    rows, cols = enc.target_positions()
    keep = rows < batch.n_rewrite
    rows, cols = rows[keep].to(device), cols[keep].to(device)
    tgt = enc.flat_targets().to(device)[keep.to(device)]
    tok_owner = batch.owner[rows]
    tok_weight = _token_weights(rows, batch, n, len(templates))
    kl_rows = torch.arange(batch.n_rewrite, batch.n_rewrite + n, device=device)
    modules = [get_module(model, s) for s in sites]
    dims = [_site_dim(model, arch, m) for m in modules]
    deltas = [torch.zeros(n, d, device=device, requires_grad=True) for d in dims]
    opt = torch.optim.Adam(deltas, lr=opts.v_lr)
    seen: list[list[torch.Tensor]] = [[] for _ in sites]
    ref_logp = None
    active = torch.ones(n, dtype=torch.bool, device=device)
    nll_req = torch.zeros(n)
    steps = 0
    with cached_prefix(model, arch, prefix_layers, enc.input_ids, enc.attention_mask), contextlib.ExitStack() as stack:
        for m, d, s in zip(modules, deltas, seen, strict=True):
            stack.enter_context(add_at_lookup(m, batch, d, s))
        for steps in range(1, opts.v_num_grad_steps + 1):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                hidden = final_hidden(model, enc.input_ids, enc.attention_mask)
                tok_nll = target_nll(model, hidden[rows, cols], tgt)
                nll_req = torch.zeros(n, device=device).index_add(0, tok_owner, tok_nll.detach() * tok_weight)
                kl_logp = torch.log_softmax(head_logits(model, hidden[kl_rows, batch.kl_last]).float(), -1)
                if ref_logp is None:
                    ref_logp = kl_logp.detach()
                loss = (tok_nll * tok_weight).sum()
                loss = loss + opts.kl_factor * torch.nn.functional.kl_div(kl_logp, ref_logp, log_target=True, reduction="sum")
                for d, s in zip(deltas, seen, strict=True):
                    init_norm = _request_norms(s[0], batch, n)
                    loss = loss + opts.v_weight_decay * (d.norm(dim=1) / init_norm**2).sum()
                active = nll_req > opts.early_stop_nll
                if not bool(active.any()):
                    break
                if steps == opts.v_num_grad_steps:
                    break
                loss.backward()
            for d in deltas:
                d.grad[~active] = 0
            opt.step()
            with torch.no_grad():
                for d, s in zip(deltas, seen, strict=True):
                    limit = opts.clamp_norm_factor * _request_norms(s[0], batch, n)
                    scale = (limit / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    d.mul_(scale[:, None])
    log.debug("value optimization: %d steps, nll per request %s", steps, nll_req.tolist())
    first = _first_rows(batch, n)
    return ValueResult([d.detach() for d in deltas], [s[0][first] for s in seen], steps, nll_req.cpu().tolist())


def target_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``-log P(target)`` per row over the full vocabulary, ``chunk`` rows at a time.

    Each chunk's logits are recomputed in the backward pass instead of being kept, so memory
    stays at one chunk of ``[chunk, vocab]`` logits however many edits are optimized together.
    """
    from torch.utils.checkpoint import checkpoint

    def nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head_logits(model, h).float()
        return torch.logsumexp(logits, -1) - logits.gather(1, t[:, None])[:, 0]

    if hidden.shape[0] <= chunk:
        return nll(hidden, targets)
    parts = [checkpoint(nll, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
             for i in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts)


def _token_weights(rows: torch.Tensor, batch: Batch, n: int, n_templates: int) -> torch.Tensor:
    """Each target token's weight: 1/(tokens in its row) / (rows of its request) -> per-request mean NLL."""
    counts = torch.bincount(rows, minlength=batch.n_rewrite).float()
    return 1.0 / counts[rows] / n_templates


def _first_rows(batch: Batch, n: int) -> torch.Tensor:
    """Each request's first (bare-prompt) row."""
    idx = torch.arange(batch.n_rewrite, device=batch.owner.device)
    first = torch.zeros(n, dtype=torch.long, device=batch.owner.device)
    return first.scatter_reduce(0, batch.owner[: batch.n_rewrite], idx, reduce="amin", include_self=False)


def _request_norms(initial: torch.Tensor, batch: Batch, n: int) -> torch.Tensor:
    """Norm of each request's original site output at its first (bare-prompt) row."""
    return initial[_first_rows(batch, n)].norm(dim=1)


def _site_dim(model: nn.Module, arch: ArchitectureSpec, module: nn.Module) -> int:
    """Width of a site's output: a linear layer's ``out`` dimension, else the hidden size."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        return model.config.hidden_size
    return weight.shape[1] if arch.weight_layout == "conv1d" else weight.shape[0]
