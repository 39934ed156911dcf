"""MELO's block allocation (Yu et al. 2024, Sec. 3.2): which LoRA block learns a new edit.

For the new edit's key ``h`` and its nearest key ``k_i`` (block ``b_i``, cluster ``C(b_i)``):

    join:  d(h, k_i) <= r_cluster and |C(b_i)| < max_cluster  ->  retrain b_i on C(b_i) + {edit}
    new:   otherwise                                           ->  a fresh block learns the edit

The key is added to the index in both cases. Blocks are append-only: a retrained block is stored as
a new row and its cluster's keys are pointed at it, so rows older patches use are never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codebook import Metric, nearest


@dataclass
class Allocation:
    action: str
    #: the block whose parameters start the training (None: fresh initialization)
    start_block: int | None
    #: indices of earlier keys whose edits train together with the new one
    cluster: list[int]
    nearest_distance: float | None


def allocate_block(
    keys: torch.Tensor, blocks: torch.Tensor, key: torch.Tensor, cluster_radius: float, max_cluster: int, metric: Metric
) -> Allocation:
    if keys.shape[0] == 0:
        return Allocation("new", None, [], None)
    dist, idx = nearest(key[None], keys, metric)
    d, i = float(dist[0]), int(idx[0])
    block = int(blocks[i])
    cluster = [int(j) for j in torch.nonzero(blocks == block).flatten()]
    if d <= cluster_radius and len(cluster) < max_cluster:
        return Allocation("join", block, cluster, d)
    return Allocation("new", None, [], d)
