"""Refining attributions into knowledge neurons (Dai et al. 2022, Sec. 3.3).

For each prompt, the coarse knowledge neurons are those with ``Attr > t * max Attr`` (the adaptive
threshold). Across the prompts of a fact, the knowledge neurons are the coarse neurons shared by at
least a fraction ``p`` of the prompts.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def coarse_neurons(attr: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of ``attr`` (``[layers, d_ff]``) above ``threshold * attr.max()``."""
    top = attr.max()
    if top <= 0:
        return torch.zeros_like(attr, dtype=torch.bool)
    return attr > threshold * top


def shared_neurons(
    attributions: list[torch.Tensor],
    threshold: float,
    share: float,
    max_neurons: int | None = None,
) -> list[tuple[int, int]]:
    """Knowledge neurons ``(layer slot, neuron index)``: coarse in at least ``share`` of the prompts.

    Ordered by summed attribution, largest first, and cut to ``max_neurons``. If no neuron is shared
    widely enough, the one with the largest summed attribution is kept, so every fact gets a neuron.
    """
    masks = torch.stack([coarse_neurons(a, threshold) for a in attributions])
    counts = masks.sum(0)
    total = torch.stack(attributions).sum(0)
    keep = counts >= share * len(attributions) - 1e-9
    if not keep.any():
        log.info(
            "no neuron is shared by %.0f%% of %d prompts; keeping the top-attributed one",
            100 * share,
            len(attributions),
        )
        keep = total == total.max()
    slots, idx = keep.nonzero(as_tuple=True)
    order = total[slots, idx].argsort(descending=True)
    neurons = [(int(slots[o]), int(idx[o])) for o in order]
    return neurons[:max_neurons] if max_neurons else neurons
