"""The value optimization shared by ROME (v*), MEMIT (z) and PMET (attention + FFN residuals).

A free vector ``delta_i`` per request is added to the output of one or more modules ("sites") at
the subject's last token of every prompt of that request, and optimized (ROME Eq. 4)::

    min_delta  mean_j -log P(o* | x_j + p)                          (rewriting, all templates)
             + kl_factor * KL(P(. | s is a) || P'(. | s is a))      (essence)
             + c * mean_j KL(P(. | x_j + p + o*) || P'(. | x_j + p + o*))   (continuation; c = 0: off)
             + weight_decay * ||delta|| / ||v||^2,    ||delta|| <= clamp * ||v||

with ``v`` the site's original output. Where the time goes, and what is done about it:

- nothing before a row's subject token depends on ``delta``, nothing below the sites' layer at
  all: the prefix runs once into a KV cache and only the suffix runs each step
  (:class:`kedit_rome.ops.suffix.SuffixForward`);
- the output layer (262k rows on Gemma) is applied only at the loss positions, and its value and
  gradient come from one pass over its weight (:func:`kedit_rome.ops.head_loss.head_loss`);
- a request whose rewriting NLL is below ``early_stop_nll`` stops moving and its rows leave the
  batch; requests are optimized together in groups, ``tokens_per_pass`` suffix tokens at a time,
  each pass forward and backward on its own (the loss is a sum over rows; no second forward),
  the rows ordered by suffix length so that little of what is recomputed is padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_module
from kedit_core.ops.logits import logits_at, model_device
from kedit_core.ops.tokens import encode_pairs, subject_last_token
from kedit_core.request import EditRequest

from .ops.head_loss import head_loss, head_parts
from .ops.keys import fill_templates
from .ops.suffix import SuffixForward

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
    #: also stop a request as soon as every target token is the most probable token at its position
    #: in every template (most-probable early stopping, ENCORE): the edit then does no more than make
    #: greedy decoding say the target, instead of driving its probability towards 1
    early_stop_most_probable: bool = False
    #: weight of the continuation KL: at the position after the target in every rewriting prompt, the
    #: next-token distribution is held to the unedited model's there (0: off). The rewriting loss alone
    #: lets the edited subject keep pushing the target after it was said ("Rome Rome Rome")
    continuation_kl_factor: float = Field(default=0.0, ge=0)
    #: positions the continuation KL covers: the one after the target, then those of the unedited
    #: model's greedy continuation of each rewriting prompt + target (loops can start a few tokens on)
    continuation_tokens: int = Field(default=1, ge=1)
    #: with a continuation KL: a request whose rewriting NLL is low enough keeps moving until its mean
    #: continuation KL (nats per position) is below this too. Stopping on the rewriting NLL alone ends the
    #: optimization within a few steps at a large learning rate, before the continuation term has acted
    #: (the target then loops); None: the rewriting NLL alone decides
    early_stop_continuation_kl: float | None = Field(default=None, ge=0)
    #: suffix tokens (padding included) run through the model per forward/backward pass: bounds
    #: activation memory; each pass goes forward, through the
    #: output layer and backward before the next. A prompt longer than this gets a pass alone.
    tokens_per_pass: int = Field(default=256, ge=1)


@dataclass
class Batch:
    """The prompts of the optimization: rewriting rows then one essence row per request."""

    enc: Any
    owner: torch.Tensor  # [rows] request index of each row
    lookup: torch.Tensor  # [rows] subject-last-token position
    n_rewrite: int
    kl_last: torch.Tensor  # [n_requests] last position of each essence row
    target_last: torch.Tensor  # [n_rewrite] each rewriting row's last target token (predicts what follows)
    continued: int = 0  # tokens of the unedited model's greedy continuation after each rewriting row's target


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
    target_last = [enc.prompt_lens[i] + len(enc.target_ids[i]) - 1 for i in range(n_rewrite)]
    return Batch(
        enc,
        torch.tensor(owner, device=device),
        torch.tensor(lookup, device=device),
        n_rewrite,
        torch.tensor(kl_last, device=device),
        torch.tensor(target_last, device=device),
    )


@torch.no_grad()
def continue_rows(model: nn.Module, batch: Batch, tokens: int) -> None:
    """Append to each rewriting row (prompt + target) ``tokens`` tokens of the model's greedy
    continuation (the model as it is: unedited, before the deltas' hooks); the essence rows are
    padded to the new width. ``batch.continued`` records how many."""
    enc, n = batch.enc, batch.n_rewrite
    ids = torch.cat([enc.input_ids, enc.input_ids.new_zeros(len(enc.input_ids), tokens)], 1)
    mask = torch.cat([enc.attention_mask, enc.attention_mask.new_zeros(len(enc.input_ids), tokens)], 1)
    rows = torch.arange(n, device=ids.device)
    for j in range(tokens):
        last = batch.target_last + j
        logits = logits_at(model, ids[:n], mask[:n], rows, last)
        ids[rows, last + 1] = logits.argmax(-1).to(ids.dtype)
        mask[rows, last + 1] = 1
    enc.input_ids, enc.attention_mask = ids, mask
    batch.continued = tokens


@dataclass
class ValueResult:
    deltas: list[torch.Tensor]  # per site, [n_requests, d]
    initial: list[torch.Tensor]  # per site, [n_requests, d]: the original site output, bare prompt
    steps: int
    nll: list[float]


def optimize_values_chunked(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    sites: Sequence[str],
    prefix_layers: int,
    opts: ValueOptions,
    chunk: int,
    clamp_factors: Sequence[float] | None = None,
) -> ValueResult:
    """:func:`optimize_values` over groups of ``chunk`` requests (they are independent): memory
    for activations stays that of one group however large the batch of edits."""
    parts = [
        optimize_values(
            model, tokenizer, arch, requests[i : i + chunk], templates, sites, prefix_layers, opts, clamp_factors
        )
        for i in range(0, len(requests), chunk)
    ]
    return ValueResult(
        [torch.cat([p.deltas[s] for p in parts]) for s in range(len(sites))],
        [torch.cat([p.initial[s] for p in parts]) for s in range(len(sites))],
        max(p.steps for p in parts),
        [x for p in parts for x in p.nll],
    )


@dataclass
class LossRows:
    """Where the loss reads the model: each target token of the rewriting rows, then the KL
    positions (``target = -1``): each essence row's last prompt position and, with a continuation KL,
    each rewriting row's last target token; with its weight, its request and (KL positions) its row of
    the reference log-probabilities."""

    row: torch.Tensor
    col: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    owner: torch.Tensor
    ref_row: torch.Tensor  # reference row of each KL position (-1 elsewhere)
    continuation: torch.Tensor  # [entries] bool: a continuation KL position

    @property
    def n_ref(self) -> int:
        """KL positions, each with its own row of reference log-probabilities."""
        return int((self.ref_row >= 0).sum())


def loss_rows(batch: Batch, n: int, n_templates: int, kl_factor: float, continuation_kl: float = 0.0) -> LossRows:
    device = batch.owner.device
    rows, cols = batch.enc.target_positions()
    keep = rows < batch.n_rewrite
    rows, cols = rows[keep].to(device), cols[keep].to(device)
    tgt = batch.enc.flat_targets().to(device)[keep.to(device)]
    kl_rows = torch.arange(batch.n_rewrite, batch.n_rewrite + n, device=device)
    kl_cols, kl_weights = batch.kl_last, torch.full((n,), kl_factor, device=device)
    after = kl_rows[:0]
    if continuation_kl > 0:
        span = batch.continued + 1
        after = torch.arange(batch.n_rewrite, device=device).repeat_interleave(span)
        steps = torch.arange(span, device=device).repeat(batch.n_rewrite)
        kl_rows = torch.cat([kl_rows, after])
        kl_cols = torch.cat([kl_cols, batch.target_last.repeat_interleave(span) + steps])
        weight = continuation_kl / n_templates / span
        kl_weights = torch.cat([kl_weights, torch.full((len(after),), weight, device=device)])
    row = torch.cat([rows, kl_rows])
    n_ref = len(kl_rows)
    return LossRows(
        row,
        torch.cat([cols, kl_cols]),
        torch.cat([tgt, torch.full((n_ref,), -1, device=device)]),
        torch.cat([_token_weights(rows, batch, n, n_templates), kl_weights]),
        batch.owner[row],
        torch.cat([torch.full((len(rows),), -1, device=device), torch.arange(n_ref, device=device)]),
        torch.arange(len(row), device=device) >= len(row) - len(after),
    )


class _AddAtFirst:
    """Forward hook: add ``delta_rows[r]`` to the module's output at suffix column 0 (the subject's
    last token) of each row; on request, record the original outputs there."""

    def __init__(self, module: nn.Module) -> None:
        self.delta_rows: torch.Tensor | None = None
        self.capture: list[torch.Tensor] | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, _m: nn.Module, _args: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        if self.capture is not None:
            self.capture.append(out[:, 0].detach().clone())
        new = torch.cat([out[:, :1] + self.delta_rows[:, None].to(out.device, out.dtype), out[:, 1:]], 1)
        return (new, *output[1:]) if isinstance(output, tuple) else new


@dataclass
class _Chunk:
    runner: SuffixForward
    rows: torch.Tensor  # [rows] batch rows
    owner: torch.Tensor  # [rows] request of each row
    entries: torch.Tensor  # indices into LossRows
    local: torch.Tensor  # each entry's row within the chunk
    col: torch.Tensor  # each entry's suffix column


def _chunk(runner: SuffixForward, rows: torch.Tensor, batch: Batch, loss: LossRows) -> _Chunk:
    local = torch.full((len(batch.owner),), -1, dtype=torch.long, device=rows.device)
    local[rows] = torch.arange(len(rows), device=rows.device)
    entries = (local[loss.row] >= 0).nonzero()[:, 0]
    return _Chunk(
        runner,
        rows,
        batch.owner[rows],
        entries,
        local[loss.row[entries]],
        loss.col[entries] - batch.lookup[loss.row[entries]],
    )


def _first_chunks(
    model: nn.Module, arch: ArchitectureSpec, batch: Batch, loss: LossRows, frozen: int, tokens_per_pass: int
) -> list[_Chunk]:
    """All rows in passes of at most ``tokens_per_pass`` padded suffix tokens, each with its own
    suffix runner. Rows are ordered by suffix length (then prefix length): the suffix is what every
    step recomputes, so its padding is the waste that counts; the prefix runs once."""
    enc = batch.enc
    suffix = enc.attention_mask.long().sum(1) - batch.lookup
    order = torch.argsort(suffix * (int(batch.lookup.max()) + 1) + batch.lookup, stable=True)
    parts, start = [], 0
    for i in range(1, len(order) + 1):
        # ascending suffix lengths: a pass of rows start..i is (i - start) x suffix[order[i - 1]] tokens
        if i == len(order) or (i + 1 - start) * int(suffix[order[i]]) > tokens_per_pass:
            parts.append(order[start:i])
            start = i
    return [
        _chunk(
            SuffixForward(model, arch, enc.input_ids[part], enc.attention_mask[part], batch.lookup[part], frozen),
            part,
            batch,
            loss,
        )
        for part in parts
    ]


def _shrink(chunks: list[_Chunk], active: torch.Tensor, batch: Batch, loss: LossRows) -> list[_Chunk]:
    """Drop the rows of requests that stopped."""
    out = []
    for c in chunks:
        keep = active[c.owner]
        if bool(keep.all()):
            out.append(c)
        elif bool(keep.any()):
            idx = keep.nonzero()[:, 0]
            out.append(_chunk(c.runner.select(idx), c.rows[idx], batch, loss))
    return out


def optimize_values(
    model: nn.Module,
    tokenizer: Any,
    arch: ArchitectureSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    sites: Sequence[str],
    prefix_layers: int,
    opts: ValueOptions,
    clamp_factors: Sequence[float] | None = None,
) -> ValueResult:
    """Optimize one delta per request per site; see the module docstring for the objective.
    ``clamp_factors``: one norm-clamp factor per site (default ``opts.clamp_norm_factor`` for each).

    Only the positions from each row's subject token on are recomputed (:class:`SuffixForward`),
    the output layer is applied only at the loss positions (:func:`head_loss`), and a request whose
    NLL is below ``early_stop_nll`` stops moving and leaves the batch. Rows are run
    ``opts.tokens_per_pass`` suffix tokens at a time, each pass forward, through the output layer
    and backward on its own: the loss is a sum over rows, so the passes' gradients add up to the
    whole step's (and each pass's graph is freed before the next).
    """
    device = model_device(model)
    batch = build_batch(tokenizer, requests, templates, device)
    if opts.continuation_kl_factor > 0 and opts.continuation_tokens > 1:
        continue_rows(model, batch, opts.continuation_tokens - 1)
    n = len(requests)
    loss = loss_rows(batch, n, len(templates), opts.kl_factor, opts.continuation_kl_factor)
    modules = [get_module(model, s) for s in sites]
    deltas = [torch.zeros(n, _site_dim(model, arch, m), device=device, requires_grad=True) for m in modules]
    opt = torch.optim.Adam(deltas, lr=opts.v_lr)
    clamps = list(clamp_factors) if clamp_factors is not None else [opts.clamp_norm_factor] * len(sites)
    if len(clamps) != len(sites):
        raise ValueError(f"{len(clamps)} clamp factors for {len(sites)} sites")
    # [KL positions, V] the log-probabilities before the edit (filled at step 1)
    ref = torch.empty(loss.n_ref, head_parts(model)[0].shape[0], device=device)
    init_norms: list[torch.Tensor] = []
    initial: list[torch.Tensor] = []
    active = torch.ones(n, dtype=torch.bool, device=device)
    nll_req = torch.zeros(n, device=device)
    missed = torch.zeros(n, device=device)  # per request: target tokens not the most probable
    kl_req = torch.zeros(n, device=device)  # per request: weighted continuation KL
    first = _first_rows(batch, n)
    chunks = _first_chunks(model, arch, batch, loss, prefix_layers, opts.tokens_per_pass)  # before the hooks
    hooks = [_AddAtFirst(m) for m in modules]
    steps = 0
    try:
        for steps in range(1, opts.v_num_grad_steps + 1):
            chunks = _shrink(chunks, active, batch, loss)
            for h in hooks:
                h.capture = [] if steps == 1 else None
            opt.zero_grad(set_to_none=True)
            nll_req = nll_req.index_fill(0, active.nonzero()[:, 0], 0.0)
            missed = missed.index_fill(0, active.nonzero()[:, 0], 0.0)
            kl_req = kl_req.index_fill(0, active.nonzero()[:, 0], 0.0)
            for c in chunks:
                _chunk_step(model, c, hooks, deltas, loss, ref, (nll_req, missed, kl_req), record=steps == 1)
            if steps == 1:
                order = torch.cat([c.rows for c in chunks])
                initial = [torch.cat(h.capture)[torch.argsort(order)][first] for h in hooks]
                init_norms = [x.norm(dim=1) for x in initial]
            active = active & ~_done(opts, nll_req, missed, kl_req)
            if not bool(active.any()) or steps == opts.v_num_grad_steps:
                break
            with torch.enable_grad():
                decay = sum(
                    opts.v_weight_decay * (d.norm(dim=1)[active] / norm[active] ** 2).sum()
                    for d, norm in zip(deltas, init_norms, strict=True)
                )
                decay.backward()
            before = [d.detach().clone() for d in deltas]
            for d in deltas:
                d.grad[~active] = 0
            opt.step()
            with torch.no_grad():
                for d, b, norm, factor in zip(deltas, before, init_norms, clamps, strict=True):
                    d[~active] = b[~active]  # stopped requests stay where they stopped
                    clamp = (factor * norm / d.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    d.mul_(clamp[:, None])
    finally:
        for h in hooks:
            h.handle.remove()
    log.debug("value optimization: %d steps, nll per request %s", steps, nll_req.tolist())
    return ValueResult([d.detach() for d in deltas], initial, steps, nll_req.cpu().tolist())


def _done(opts: ValueOptions, nll_req: torch.Tensor, missed: torch.Tensor, kl_req: torch.Tensor) -> torch.Tensor:
    """The requests whose optimization can stop: rewriting NLL below ``early_stop_nll`` (or, with
    most-probable early stopping, every target token the most probable) and, when asked, their mean
    continuation KL below ``early_stop_continuation_kl``."""
    done = nll_req <= opts.early_stop_nll
    if opts.early_stop_most_probable:
        done = done | (missed == 0)
    if opts.early_stop_continuation_kl is not None and opts.continuation_kl_factor > 0:
        done = done & (kl_req / opts.continuation_kl_factor <= opts.early_stop_continuation_kl)
    return done


def _chunk_step(
    model: nn.Module,
    c: _Chunk,
    hooks: list[_AddAtFirst],
    deltas: list[torch.Tensor],
    loss: LossRows,
    ref: torch.Tensor,
    per_request: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    record: bool,
) -> None:
    """One pass: the chunk's rows forward with the deltas, their loss entries through the output
    layer, backward into the deltas' gradients. ``per_request`` = (rewriting NLL, count of target
    tokens that are not the most probable, weighted continuation KL), each added to per request."""
    nll_req, missed, kl_req = per_request
    for h, d in zip(hooks, deltas, strict=True):
        h.delta_rows = d[c.owner]
    with torch.enable_grad():
        hidden = c.runner()[c.local, c.col]
        tgt, owner, weight = loss.target[c.entries], loss.owner[c.entries], loss.weight[c.entries]
        is_kl = tgt < 0
        top = torch.ones(len(tgt), dtype=torch.bool, device=hidden.device)
        per = head_loss(model, hidden, tgt, ref, loss.ref_row[c.entries][is_kl], record=record, top=top)
        nll_req.index_add_(0, owner[~is_kl], (per.detach() * weight)[~is_kl])
        missed.index_add_(0, owner[~is_kl], (~top[~is_kl]).to(missed.dtype))
        cont = loss.continuation[c.entries]
        kl_req.index_add_(0, owner[cont], (per.detach() * weight)[cont])
        (per * weight).sum().backward()


def _token_weights(rows: torch.Tensor, batch: Batch, n: int, n_templates: int) -> torch.Tensor:
    """Each target token's weight: 1/(tokens in its row) / (rows of its request) -> per-request mean NLL."""
    counts = torch.bincount(rows, minlength=batch.n_rewrite).float()
    return 1.0 / counts[rows] / n_templates


def _first_rows(batch: Batch, n: int) -> torch.Tensor:
    """Each request's first (bare-prompt) row."""
    idx = torch.arange(batch.n_rewrite, device=batch.owner.device)
    first = torch.zeros(n, dtype=torch.long, device=batch.owner.device)
    return first.scatter_reduce(0, batch.owner[: batch.n_rewrite], idx, reduce="amin", include_self=False)


def _site_dim(model: nn.Module, arch: ArchitectureSpec, module: nn.Module) -> int:
    """Width of a site's output: a linear layer's ``out`` dimension, else the hidden size."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        return model.config.hidden_size
    return weight.shape[1] if arch.weight_layout == "conv1d" else weight.shape[0]
