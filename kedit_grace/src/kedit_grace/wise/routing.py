"""WISE's routing objective, threshold and gradient mask (Wang et al. 2024, Sec. 2.3).

With ``Delta_act`` the side memory's activation score (:mod:`.side_memory`), edit inputs ``x_e`` and
irrelevant inputs ``x_i``, the side memory is trained on the edit loss plus the margin loss

    L_a = ReLU(Delta_act(x_i) - alpha) + ReLU(beta - Delta_act(x_e))
          + ReLU(gamma - (Delta_act(x_e) - Delta_act(x_i)))

so that edits score above ``beta``, irrelevant inputs below ``alpha``, with a gap of at least
``gamma``. kedit scores per position: ``x_e`` is an edit prompt's last token (the position that
predicts the answer, where a hit must happen), and ``x_i`` is every other position it has seen --
irrelevant prompts and the edit sequences' other tokens -- since any position above the threshold
would hit (the gap is kept to the highest of them, :func:`routing_loss`). Edits made earlier in a sequential run keep their own
``beta`` term (their keys are stored, so the term costs one matrix product), which keeps them
routed while the side memory learns new ones.

The routing threshold is the paper's: the smallest score of an edit, times ``act_ratio``.

Knowledge sharding trains only a random fraction ``rho`` of the side memory's entries
(:func:`gradient_mask`): ``W_v' <- W_v' - lr * (M_i ⊙ grad)``, with ``M_i`` the mask of the shard
``i`` that takes the edit. kedit's shards are disjoint subspaces of one side memory: the paper merges
the shards' deltas ``tau_i = W_i - W_v`` by Ties-merging (trim, elect a sign per entry, average the
entries that agree), which for untrimmed deltas on disjoint entries is their sum -- what one side memory trained
under the shards' masks in turn holds, so the merged memory serves every edit at every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingSet(NamedTuple):
    """The activations the routing loss reads: the new edits' keys ``[E, in]``, earlier edits' keys
    ``[K, in]`` and every irrelevant position ``[M, in]`` (constants: the side memory sits above them)."""

    keys: torch.Tensor
    old_keys: torch.Tensor
    others: torch.Tensor


def activation_scores(acts: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``|| a_n delta^T ||_2`` for activations ``[N, in]`` and ``delta = W_v' - W_v`` ``[out, in]``."""
    return (acts @ delta.T).norm(dim=-1)


def routing_loss(
    edit_scores: torch.Tensor,
    irrelevant_scores: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    n_irrelevant: int | None = None,
) -> torch.Tensor:
    """``L_a`` over the edits (mean) and the irrelevant positions: the ``alpha`` hinge is averaged over
    every position (each one above the margin gets a gradient), the ``gamma`` gap is taken to the
    highest irrelevant score (the one a threshold must stay above). ``irrelevant_scores`` may be a
    subset of ``n_irrelevant`` positions that holds every one above ``alpha`` and the highest
    (:func:`active_positions`): the loss and its gradient are then those of the whole set."""
    relu = torch.nn.functional.relu
    loss = relu(beta - edit_scores).mean()
    if irrelevant_scores.numel():
        total = n_irrelevant if n_irrelevant is not None else irrelevant_scores.numel()
        loss = loss + relu(irrelevant_scores - alpha).sum() / total
        loss = loss + relu(gamma - (edit_scores - irrelevant_scores.max())).mean()
    return loss


def active_positions(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Indices of the positions :func:`routing_loss` reads gradients from: every score above ``alpha``
    and the highest (the ``gamma`` gap's); the rest contribute nothing. Scoring every position without
    a graph and again only these with one costs about a third of scoring all of them with one."""
    active = scores > alpha
    if scores.numel():
        active[scores.argmax()] = True
    return active.nonzero().flatten()


def threshold(edit_scores: torch.Tensor, act_ratio: float) -> float:
    """``eps = act_ratio * min_e Delta_act(x_e)`` (``inf`` with no edits: nothing is routed)."""
    if edit_scores.numel() == 0:
        return float("inf")
    return float(act_ratio * edit_scores.min())


def gradient_mask(
    shape: tuple[int, ...], ratio: float, seed: int, device: torch.device | str = "cpu", shard: int = 0
) -> torch.Tensor:
    """A fixed random ``{0, 1}`` mask with (about) ``ratio`` of its entries set, drawn from ``seed`` on
    the CPU (the same mask on every device and for every edit of a shard). Shard ``i`` sets the entries
    whose uniform draw lies in ``[i * ratio, (i + 1) * ratio)``: the masks of shards ``0 .. k-1`` are
    disjoint while ``k * ratio <= 1``, and shard 0's is the unsharded mask."""
    if ratio >= 1.0:
        return torch.ones(shape, device=device)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen)
    return ((u >= shard * ratio) & (u < (shard + 1) * ratio)).float().to(device)
