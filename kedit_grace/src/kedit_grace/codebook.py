"""Nearest-key lookup with deferral radii, per position -- shared by GRACE's codebook and MELO's
key index.

For a query ``h_t`` (the wrapped layer's input at position ``t``) and keys ``K`` with radii ``eps``:

    i*(t) = argmin_i d(h_t, K_i),     hit(t) = d(h_t, K_{i*}) <= eps_{i*}          (GRACE, Eq. 2)

A hit at the last token of an edited prompt selects the entry that answers it. The entry then
stays active for ``span`` positions, the hit included, until another position hits another entry:

    s(t) = the last position <= t with hit(s)
    active(t) = i*(s)   if t - s < span_{i*(s)};     -1 (defer to the layer) otherwise.

GRACE and MELO give each entry the length of its answer (the tokens of ``" " + label``,
:func:`kedit_grace.keys.answer_span`): the positions that predict the answer's tokens,
teacher-forced or generated one at a time from the KV cache, get the entry's value (GRACE) or its
LoRA block (MELO), and the text after the answer runs the layer unchanged -- the edit answers the
edited input, it does not force its target on every later token. Without spans a hit holds for the
rest of the sequence. Positions before the first hit, and every position of a sequence that hits
nothing, run the original layer.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Metric = Literal["euclidean", "cosine"]

#: the span of an entry that holds for the rest of the sequence
UNBOUNDED = 2**62


class Routing(NamedTuple):
    """``active`` (``[B, T]``, ``-1``: defer) and ``left`` (``[B, T]``): how many positions after ``t``
    the active entry still covers (0 where none is active)."""

    active: torch.Tensor
    left: torch.Tensor


class Carry(NamedTuple):
    """The routing at the end of the previous forward of the same sequences (cached decoding):
    ``entry`` (``[B]``, ``-1``: none) still covers the next ``left`` (``[B]``) positions."""

    entry: torch.Tensor
    left: torch.Tensor


def distances(queries: torch.Tensor, keys: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``[N, K]`` distances between ``[N, D]`` queries and ``[K, D]`` keys (cosine: the euclidean
    distance of unit vectors, in [0, 2])."""
    q, k = queries.float(), keys.float().to(queries.device)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
    return torch.cdist(q, k)


def nearest(queries: torch.Tensor, keys: torch.Tensor, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest key for each ``[N, D]`` query."""
    d = distances(queries, keys, metric)
    return d.min(dim=1)


def route_positions(
    queries: torch.Tensor,
    keys: torch.Tensor,
    radii: torch.Tensor,
    metric: Metric,
    mask: torch.Tensor | None = None,
    carry: Carry | None = None,
    spans: torch.Tensor | None = None,
) -> Routing:
    """The active entry at each position and how long it stays active (see the module docstring).

    ``queries`` is ``[B, T, D]`` (or ``[T, D]``, giving ``[T]`` results); ``mask`` (``[B, T]``, 1 =
    real token) keeps padding from hitting an entry; ``carry`` continues the previous forward of
    the same sequences; ``spans`` (``[K]``) is how many positions each entry answers, hit included
    (``None``: the rest of the sequence).
    """
    squeeze = queries.ndim == 2
    if squeeze:
        queries = queries.unsqueeze(0)
    b, t, dim = queries.shape
    hit = idx = None
    if keys.shape[0] > 0:
        dist, idx = nearest(queries.reshape(b * t, dim).detach(), keys, metric)
        hit = (dist <= radii.to(queries.device).float()[idx]).view(b, t)
        idx = idx.view(b, t)
        if mask is not None and mask.shape == hit.shape:
            hit = hit & mask.to(queries.device).bool()
    routing = spread_hits(hit, idx, (b, t), queries.device, carry, spans)
    if squeeze:
        return Routing(routing.active[0], routing.left[0])
    return routing


def spread_hits(
    hit: torch.Tensor | None,
    entry: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    carry: Carry | None = None,
    spans: torch.Tensor | None = None,
) -> Routing:
    """Routing from hits already decided: ``hit`` (``[B, T]`` bool, ``None``: no entries) says where a
    position hits, ``entry`` (``[B, T]``) which entry it hits there. Each hit starts its entry's span
    (``spans[entry]`` positions, hit included; ``None``: the rest of the sequence); ``carry``
    continues the previous forward. GRACE and MELO hit on key distances (:func:`route_positions`),
    WISE on its side memory's activation score (:mod:`kedit_grace.wise.side_memory`)."""
    b, t = shape
    positions = torch.arange(t, device=device).expand(b, t)
    if carry is not None and carry.entry.shape[0] == b:
        c_entry = carry.entry.to(device).long().view(b, 1)
        c_left = carry.left.to(device).long().view(b, 1)
    else:
        c_entry = torch.full((b, 1), -1, dtype=torch.long, device=device)
        c_left = torch.zeros((b, 1), dtype=torch.long, device=device)
    # what the previous forward still covers: its entry, for its remaining positions
    left = c_left - 1 - positions
    active = torch.where((left >= 0) & (c_entry >= 0), c_entry.expand(b, t), torch.full_like(positions, -1))
    if hit is not None and entry is not None:
        last_hit = torch.where(hit, positions, torch.full_like(positions, -1)).cummax(dim=1).values
        hit_entry = entry.gather(1, last_hit.clamp(min=0))
        span = torch.full_like(hit_entry, UNBOUNDED) if spans is None else spans.to(device).long()[hit_entry]
        hit_left = span - 1 - (positions - last_hit)
        after_hit = last_hit >= 0
        left = torch.where(after_hit, hit_left, left)
        active = torch.where(after_hit, torch.where(hit_left >= 0, hit_entry, -1), active)
    left = torch.where(active >= 0, left, torch.zeros_like(left))
    return Routing(active, left)


def route(
    queries: torch.Tensor,
    keys: torch.Tensor,
    radii: torch.Tensor,
    metric: Metric,
    mask: torch.Tensor | None = None,
    carry: Carry | None = None,
    spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]`` (or ``[T]``) index of the active entry at each position (``-1``: defer to the layer)."""
    return route_positions(queries, keys, radii, metric, mask, carry, spans).active


class DecodingState:
    """Carries each sequence's routing from one forward to the next while a model generates from its
    key-value cache: an entry hit at the prompt's last token keeps answering for the rest of its
    span when the following tokens arrive one call at a time (the teacher-forced forward gets the
    same from :func:`route_positions`).

    A pre-hook on the model's decoder stack tells a continuing call (non-empty cache) from a new one.
    """

    def __init__(self) -> None:
        self.continuing = False
        self.last: Carry | None = None
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.continuing = int(seen) > 0

    def attach(self, model: torch.nn.Module) -> DecodingState:
        self._handle = getattr(model, "base_model", model).register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def carry(self, batch: int) -> Carry | None:
        if self.continuing and self.last is not None and self.last.entry.shape[0] == batch:
            return self.last
        return None

    def update(self, routing: Routing) -> None:
        active, left = routing
        if active.ndim == 1:
            active, left = active.unsqueeze(0), left.unsqueeze(0)
        self.last = Carry(active[:, -1].detach(), left[:, -1].detach())


class Growable:
    """Rows appended in place to spare capacity, handed out as ``[:n]`` views.

    Each patch of a sequential chain carries the whole codebook; views into one growing buffer let
    the chain share storage instead of holding N copies. Rows already handed out are never
    written again; a view's rows stay valid when the buffer is reallocated (the old storage lives
    on in the views that use it).
    """

    def __init__(self, initial: torch.Tensor, capacity: int = 16) -> None:
        n = initial.shape[0]
        cap = max(capacity, 2 * n)
        self.buf = torch.empty((cap, *initial.shape[1:]), dtype=initial.dtype, device=initial.device)
        self.buf[:n] = initial
        self.n = n

    def view(self) -> torch.Tensor:
        return self.buf[: self.n]

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        if self.n + k > self.buf.shape[0]:
            bigger = torch.empty((2 * (self.n + k), *self.buf.shape[1:]), dtype=self.buf.dtype, device=self.buf.device)
            bigger[: self.n] = self.buf[: self.n]
            self.buf = bigger
        self.buf[self.n : self.n + k] = rows.to(self.buf.device, self.buf.dtype)
        self.n += k
        return self.view()

    def owns_tail_of(self, t: torch.Tensor) -> bool:
        """True when ``t`` is this buffer's current ``[:n]`` view (so appending cannot clobber it)."""
        return t.shape[0] == self.n and t.data_ptr() == self.buf.data_ptr() and t.dtype == self.buf.dtype


class TailCache:
    """The growable buffers behind the latest patch a method computed (a few, keyed by tensor)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.items: list[Growable] = []

    def grow(self, current: torch.Tensor) -> Growable:
        """A growable whose view is ``current``: reused when it owns ``current``'s tail, else a copy."""
        for g in self.items:
            if g.owns_tail_of(current):
                return g
        g = Growable(current.detach())
        self.items = [g, *self.items][: self.size]
        return g
