"""Nearest-key lookup with deferral radii, per position -- shared by GRACE's codebook and MELO's
key index.

For a query ``h_t`` (the wrapped layer's input at position ``t``) and keys ``K`` with radii ``eps``:

    i*(t) = argmin_i d(h_t, K_i),     hit(t) = d(h_t, K_{i*}) <= eps_{i*}          (GRACE, Eq. 2)

A hit at the last token of an edited prompt selects the entry that answers it; GRACE applies the
selected value to that position and to every later position of the sequence (the answer's tokens,
whether generated or teacher-forced), until another position hits another entry. So

    active(t) = i*(s),  s = the last position <= t with hit(s);   -1 (defer to the layer) if none.

Positions before the first hit -- and every position of a sequence that hits nothing -- run the
original layer unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

Metric = Literal["euclidean", "cosine"]


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


def route(
    queries: torch.Tensor,
    keys: torch.Tensor,
    radii: torch.Tensor,
    metric: Metric,
    mask: torch.Tensor | None = None,
    carry: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]`` index of the active entry at each position (``-1``: defer to the layer).

    ``queries`` is ``[B, T, D]`` (or ``[T, D]``); ``mask`` (``[B, T]``, 1 = real token) keeps
    padding from hitting an entry; ``carry`` (``[B]``) is the entry active at the end of the
    previous forward when this one continues the same sequences (cached decoding).
    """
    squeeze = queries.ndim == 2
    if squeeze:
        queries = queries.unsqueeze(0)
    b, t, dim = queries.shape
    device = queries.device
    before = torch.full((b, 1), -1, dtype=torch.long, device=device)
    if carry is not None and carry.shape[0] == b:
        before = carry.to(device).long().view(b, 1)
    if keys.shape[0] == 0:
        active = before.expand(b, t).clone()
        return active[0] if squeeze else active
    dist, idx = nearest(queries.reshape(b * t, dim).detach(), keys, metric)
    hit = (dist <= radii.to(device).float()[idx]).view(b, t)
    idx = idx.view(b, t)
    if mask is not None and mask.shape == hit.shape:
        hit = hit & mask.to(device).bool()
    positions = torch.arange(t, device=device).expand(b, t)
    last_hit = torch.where(hit, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    active = torch.where(last_hit >= 0, idx.gather(1, last_hit.clamp(min=0)), before.expand(b, t))
    return active[0] if squeeze else active


class DecodingState:
    """Carries each sequence's active entry from one forward to the next while a model generates
    from its key-value cache: the entry hit at the prompt's last token keeps answering for the
    tokens generated one call at a time (the teacher-forced forward gets the same by :func:`route`).

    A pre-hook on the model's decoder stack tells a continuing call (non-empty cache) from a new one.
    """

    def __init__(self) -> None:
        self.continuing = False
        self.last: torch.Tensor | None = None
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

    def carry(self, batch: int) -> torch.Tensor | None:
        if self.continuing and self.last is not None and self.last.shape[0] == batch:
            return self.last
        return None

    def update(self, active: torch.Tensor) -> None:
        self.last = (active if active.ndim == 2 else active.unsqueeze(0))[:, -1].detach()


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
