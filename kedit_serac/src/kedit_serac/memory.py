"""Routing every forward and generate call of a model through an edit memory.

A memory holds, for each stored edit, a conditioning context (text) and a scope rule. For a batch
row whose text ``x`` falls in the scope of edit ``e``, the output is that of the model run on
``c_e ⊕ x`` (the counterfactual model of SERAC, the in-context prompt of IKE) at the positions of
``x``; other rows keep the base model's output:

    h(x) = h_base(c_e ⊕ x)[positions of x]   if x is in the scope of e,   else h_base(x)

It is installed as a forward hook on ``model.base_model`` (so ``model(...)`` and the
``base_model + lm_head`` path of :mod:`kedit_core.ops.logits` both see it) and as an instance-level
``generate`` that turns the KV cache off (each step then re-reads the whole row). Within one
``generate`` call the scope is decided once, on the prompts (the first forward): a prompt out of
scope is continued by the base model alone even if its continuation comes to name an edit, and
one in scope keeps its edit. A memory may name stop texts (IKE: its demonstrations' separator): a
row routed to it ends, inside ``generate``, once its continuation contains one -- the in-context
format would otherwise be written on after the answer (a new "New Fact: ..." block). Rows out of
scope are never stopped by it. Removing the last memory removes the hook and the ``generate``
attribute: the model is as it was.

The tokenizer that reads the rows and encodes the contexts is the one the patch is applied with
(``patch.apply(model, tokenizer=tok)``); memories stacked on one model share the first one's.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from kedit_core.errors import PatchError

log = logging.getLogger(__name__)

ROUTER_ATTR = "_kedit_memory_router"
#: contexts whose keys/values a memory keeps (computed once per edit, reused by every routed row)
KV_CACHE_EDITS = 256


def require_tokenizer(tokenizer: Any, what: str) -> Any:
    """``tokenizer``, or a one-line :class:`PatchError` saying that ``what`` (a patch) needs it."""
    if tokenizer is None:
        raise PatchError(f"{what} needs the model's tokenizer: patch.apply(model, tokenizer=tok)")
    return tokenizer


@dataclass
class Memory:
    """One applied memory patch: contexts and a scope rule.

    ``route(texts)`` returns, per text, ``(edit index, score)`` or ``None`` when out of scope;
    ``stops``: texts that end a routed row's continuation in ``generate`` (none: it runs on).
    """

    contexts: list[str]
    route: Callable[[list[str]], list[tuple[int, float] | None]]
    stops: tuple[str, ...] = ()
    context_ids: list[list[int]] = field(default_factory=list)
    kv: dict[int, Any] = field(default_factory=dict, repr=False)


class MemoryRouter:
    """The hook object installed on one model; holds a LIFO stack of memories."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.memories: list[Memory] = []
        self._busy = False
        #: within a generate call: the routes decided on its prompts (None until its first forward)
        self._generating = False
        self._pinned: list[tuple[Memory, int] | None] | None = None
        self._handle = model.base_model.register_forward_hook(self._hook, with_kwargs=True)
        original_generate = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            kwargs["use_cache"] = False
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and any(m.stops for m in self.memories):
                given = kwargs.get("stopping_criteria") or []
                kwargs["stopping_criteria"] = StoppingCriteriaList([*given, _MemoryStop(self, ids.shape[1])])
            outer = self._generating, self._pinned
            self._generating, self._pinned = True, None
            try:
                return original_generate(*args, **kwargs)
            finally:
                self._generating, self._pinned = outer

        model.__dict__["generate"] = generate

    def push(self, memory: Memory) -> None:
        memory.context_ids = [self.tokenizer(c)["input_ids"] for c in memory.contexts]
        self.memories.append(memory)

    def pop(self, memory: Memory) -> None:
        if not self.memories or self.memories[-1] is not memory:
            raise PatchError("memory patches are removed in last-in-first-out order")
        self.memories.pop()

    def remove(self) -> None:
        self._handle.remove()
        self.model.__dict__.pop("generate", None)
        self.model.__dict__.pop(ROUTER_ATTR, None)

    # -- routing ----------------------------------------------------------------------------------
    def _route(self, rows: list[list[int]]) -> list[tuple[Memory, int] | None]:
        """:meth:`_select` on the rows' texts; inside ``generate``, the choice made on the prompts."""
        if self._generating and self._pinned is not None and len(self._pinned) == len(rows):
            return self._pinned
        choice = self._select(self.tokenizer.batch_decode(rows, skip_special_tokens=True))
        if self._generating:
            self._pinned = choice
        return choice

    def _select(self, texts: list[str]) -> list[tuple[Memory, int] | None]:
        """Per row, the in-scope edit with the highest score over all memories (newest wins ties)."""
        best: list[tuple[float, Memory, int] | None] = [None] * len(texts)
        for memory in self.memories:
            for i, hit in enumerate(memory.route(texts)):
                if hit is not None and (best[i] is None or hit[1] >= best[i][0]):
                    best[i] = (hit[1], memory, hit[0])
        return [None if b is None else (b[1], b[2]) for b in best]

    def _fit(self, ctx: list[int], row_len: int) -> list[int]:
        """Drop the context's oldest tokens (keeping a leading BOS) if the model cannot read it all."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not limit or len(ctx) + row_len <= limit:
            return ctx
        keep = max(0, limit - row_len - 1)
        bos = self.tokenizer.bos_token_id
        head = ctx[:1] if bos is not None and ctx and ctx[0] == bos else []
        log.warning("context of %d tokens truncated to fit %d positions", len(ctx), limit)
        return head + ctx[len(ctx) - keep :] if keep else head

    def _strip_bos(self, ctx: list[int], row: list[int]) -> bool:
        """Whether the row's leading BOS is replaced by the context's (which starts with one)."""
        bos = self.tokenizer.bos_token_id
        return bos is not None and bool(row) and row[0] == bos and bool(ctx) and ctx[0] == bos

    def _run_full(
        self,
        module: nn.Module,
        memory: Memory,
        e: int,
        idx: list[int],
        rows: list[list[int]],
        mask: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Run ``ctx ⊕ row`` for each row in ``idx``; write the row positions' hidden states into ``out``."""
        seqs, places = [], []
        for i in idx:
            row = rows[i]
            ctx = self._fit(memory.context_ids[e], len(row))
            skip = int(self._strip_bos(ctx, row))
            seqs.append(ctx + row[skip:])
            places.append((mask[i].bool().nonzero()[:, 0], torch.arange(len(ctx) - skip, len(ctx) - skip + len(row))))
        ids, m = _right_pad(seqs, self._pad_id())
        res = module(input_ids=ids.to(out.device), attention_mask=m.to(out.device), use_cache=False)
        cf = res[0] if isinstance(res, tuple) else res.last_hidden_state
        for j, i in enumerate(idx):
            dst, src = places[j]
            out[i, dst.to(out.device)] = cf[j, src.to(cf.device)].to(out.dtype)

    def _run_cached(
        self,
        module: nn.Module,
        memory: Memory,
        e: int,
        idx: list[int],
        rows: list[list[int]],
        mask: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """As :meth:`_run_full`, reading the context's keys and values from a cache computed once per edit."""
        ctx = memory.context_ids[e]
        if e not in memory.kv:
            res = module(input_ids=torch.tensor([ctx], device=out.device), use_cache=True)
            if len(memory.kv) >= KV_CACHE_EDITS:
                memory.kv.pop(next(iter(memory.kv)))
            memory.kv[e] = (_output_cache(res), res.last_hidden_state[0, -1])
        cache, last = memory.kv[e]
        skips = [int(self._strip_bos(ctx, rows[i])) for i in idx]
        bodies = [rows[i][s:] for i, s in zip(idx, skips, strict=True)]
        width = max(len(b) for b in bodies)
        if width:
            ids, m = _right_pad(bodies, self._pad_id())
            kv = copy.deepcopy(cache)
            kv.batch_repeat_interleave(len(idx))
            attn = torch.cat([torch.ones(len(idx), len(ctx), dtype=m.dtype), m], dim=1)
            res = module(
                input_ids=ids.to(out.device),
                attention_mask=attn.to(out.device),
                use_cache=True,
                cache_position=torch.arange(len(ctx), len(ctx) + width, device=out.device),
                **{_cache_kw(module): kv},
            )
            hid = res.last_hidden_state
        for j, (i, skip) in enumerate(zip(idx, skips, strict=True)):
            dst = mask[i].bool().nonzero()[:, 0].to(out.device)
            if skip:
                out[i, dst[0]] = last.to(out.dtype)
            if len(bodies[j]):
                out[i, dst[skip:]] = hid[j, : len(bodies[j])].to(out.dtype)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._busy or not self.memories:
            return output
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            log.warning("memory routing needs input_ids (got inputs_embeds); output not routed")
            return output
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2 or mask.shape[1] != input_ids.shape[1]:
            mask = torch.ones_like(input_ids)
        rows = [input_ids[i][mask[i].bool()].tolist() for i in range(input_ids.shape[0])]
        choice = self._route(rows)
        routed = [i for i, c in enumerate(choice) if c is not None]
        if not routed:
            return output
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        new_hidden = hidden.clone()
        groups: dict[tuple[int, int], list[int]] = {}
        for i in routed:
            memory, e = choice[i]  # type: ignore[misc]
            groups.setdefault((id(memory), e), []).append(i)
        self._busy = True
        try:
            for idx in groups.values():
                memory, e = choice[idx[0]]  # type: ignore[misc]
                ctx = memory.context_ids[e]
                fits = all(self._fit(ctx, len(rows[i])) is ctx for i in idx)
                if fits and not torch.is_grad_enabled():
                    self._run_cached(module, memory, e, idx, rows, mask, new_hidden)
                else:
                    self._run_full(module, memory, e, idx, rows, mask, new_hidden)
        finally:
            self._busy = False
        if isinstance(output, tuple):
            return (new_hidden, *output[1:])
        output["last_hidden_state"] = new_hidden
        return output


class _MemoryStop(StoppingCriteria):
    """Ends each row of a ``generate`` call routed to a memory with stop texts once its new text holds one."""

    def __init__(self, router: MemoryRouter, prompt_len: int) -> None:
        self.router, self.prompt_len = router, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pinned = self.router._pinned
        if pinned is None or len(pinned) != input_ids.shape[0]:
            return done
        for i, choice in enumerate(pinned):
            if choice is not None and choice[0].stops:
                text = self.router.tokenizer.decode(input_ids[i, self.prompt_len :], skip_special_tokens=True)
                done[i] = any(stop in text for stop in choice[0].stops)
        return done


def _cache_kw(module: nn.Module) -> str:
    """The keyword a base model takes its KV cache by (``cache`` in transformers 5, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    m = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        m[j, : len(s)] = 1
    return ids, m


def attach_memory(model: nn.Module, tokenizer: Any, memory: Memory) -> Callable[[], None]:
    """Install ``memory`` on ``model`` (rows and contexts read with ``tokenizer``, the model's); returns the
    callable that removes it exactly."""
    router = model.__dict__.get(ROUTER_ATTR)
    if router is None:
        router = MemoryRouter(model, tokenizer)
        model.__dict__[ROUTER_ATTR] = router
    router.push(memory)

    def detach() -> None:
        router.pop(memory)
        if not router.memories:
            router.remove()

    return detach
