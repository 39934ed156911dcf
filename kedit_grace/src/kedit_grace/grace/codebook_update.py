"""GRACE's codebook maintenance (Hartvigsen et al. 2023, Sec. 3.2, Alg. 1).

For a new edit with key ``h`` and label ``y``, nearest entry ``i`` at distance ``d``:

- **add**     if the codebook is empty or ``d > eps_i + eps_init``: new entry ``(h, v, eps_init, y)``;
- **expand**  if the balls overlap and ``y_i == y``: ``eps_i <- max(eps_i, d)`` (same answer: grow the
  ball to cover the new input -- with a relative margin of 1e-3; its value is tuned on the new input);
- **split**   if the balls overlap and ``y_i != y``: ``eps_i <- min(eps_i, d/2)`` and a new entry
  ``(h, v, min(eps_init, d/2), y)`` (the two balls no longer overlap);
- **replace** (``d == 0``, the same input again with another answer): the newer edit wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..codebook import Metric, nearest

Action = Literal["add", "expand", "split", "replace"]

#: distances below this count as the same key
SAME_KEY = 1e-6
#: an expanded ball reaches a little past the new input, so that the input is not left on the
#: boundary, where the rounding of another forward (a padded batch) could put it outside
EXPAND_MARGIN = 1e-3


@dataclass
class CodebookUpdate:
    """The new entry layout; ``row`` is the entry whose value must now be optimized."""

    action: Action
    row: int
    radii: torch.Tensor
    labels: list[str]
    new_key: torch.Tensor | None
    nearest_distance: float | None


def update_codebook(
    keys: torch.Tensor,
    radii: torch.Tensor,
    labels: list[str],
    key: torch.Tensor,
    label: str,
    eps_init: float,
    metric: Metric,
) -> CodebookUpdate:
    """Decide add / expand / split / replace for ``key`` (``[D]``); inputs are never modified."""
    radii = radii.clone()
    labels = list(labels)
    n = keys.shape[0]
    if n == 0:
        return CodebookUpdate("add", 0, torch.cat([radii, radii.new_tensor([eps_init])]), [*labels, label], key, None)
    dist, idx = nearest(key[None], keys, metric)
    d, i = float(dist[0]), int(idx[0])
    if d > float(radii[i]) + eps_init:
        return CodebookUpdate("add", n, torch.cat([radii, radii.new_tensor([eps_init])]), [*labels, label], key, d)
    if d <= SAME_KEY:
        labels[i] = label
        return CodebookUpdate("replace", i, radii, labels, None, d)
    if labels[i] == label:
        radii[i] = max(float(radii[i]), d * (1 + EXPAND_MARGIN))
        return CodebookUpdate("expand", i, radii, labels, None, d)
    half = d / 2
    radii[i] = min(float(radii[i]), half)
    new_radius = min(eps_init, half)
    return CodebookUpdate("split", n, torch.cat([radii, radii.new_tensor([new_radius])]), [*labels, label], key, d)
