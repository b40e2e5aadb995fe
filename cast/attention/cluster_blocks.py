"""Queries laid out cluster by cluster in fixed-size blocks, for per-cluster dense products.

Improved clustered attention gives every member of a cluster the same ``topk`` keys. Gathering
those keys once per query builds a (B, h, N, k, d) tensor (and its gradient), k·d numbers per
query where the query itself has d; the reference implementation avoids it with custom kernels.
In plain PyTorch the same saving comes from sorting: place the queries of each cluster in
consecutive slots, padded up to whole blocks of ``block`` slots, so that every block belongs to
one cluster. One product per block with that cluster's (k, d) keys then serves all its queries:
(blocks, block, d) @ (blocks, d, k), with blocks ≤ N / block + C per (batch, head).

Shapes: B batch, h heads, N length, C clusters, T = block, M = blocks (after the layout), d width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BlockLayout:
    """Where each query sits: ``slot`` (B, h, N) in 0..M·T - 1, and the cluster of each block
    ``block_cluster`` (B, h, M). Slots no query fills are zero rows in :meth:`to_blocks`."""

    slot: Tensor
    block_cluster: Tensor
    block: int

    @property
    def blocks(self) -> int:
        return self.block_cluster.shape[-1]

    def to_blocks(self, t: Tensor) -> Tensor:
        """Per-query rows t (B, h, N, X) -> (B, h, M, T, X), zeros in the unfilled slots."""
        b, h, _, x = t.shape
        out = t.new_zeros(b, h, self.blocks * self.block, x)
        out = out.scatter(2, self.slot.unsqueeze(-1).expand(-1, -1, -1, x), t)
        return out.view(b, h, self.blocks, self.block, x)

    def from_blocks(self, t: Tensor) -> Tensor:
        """Block rows t (B, h, M, T, X) -> each query's row (B, h, N, X)."""
        b, h, _, _, x = t.shape
        flat = t.reshape(b, h, self.blocks * self.block, x)
        return flat.gather(2, self.slot.unsqueeze(-1).expand(-1, -1, -1, x))

    def per_block(self, t: Tensor) -> Tensor:
        """Each block's row of its cluster: t (B, h, C, ...) -> (B, h, M, ...)."""
        index = self.block_cluster.view(*self.block_cluster.shape, *([1] * (t.dim() - 3)))
        return t.gather(2, index.expand(-1, -1, -1, *t.shape[3:]))


@torch.no_grad()
def block_layout(assignment: Tensor, num_clusters: int, block: int) -> BlockLayout:
    """Layout of queries by cluster, ``assignment`` (B, h, N) with -1 on padded queries.

    Padded queries go with cluster 0 (their outputs are zeroed downstream). Within a cluster the
    queries keep their order. The number of blocks M is the largest any (batch, head) needs.
    """
    cluster = assignment.clamp(min=0)
    length = cluster.shape[-1]
    sizes = torch.zeros(*cluster.shape[:2], num_clusters, dtype=torch.long, device=cluster.device)
    sizes.scatter_add_(2, cluster, torch.ones_like(cluster))
    blocks_end = torch.cumsum((sizes + block - 1) // block, dim=-1)
    first_block = blocks_end - (sizes + block - 1) // block
    first_query = torch.cumsum(sizes, dim=-1) - sizes

    order = torch.sort(cluster, dim=-1, stable=True).indices
    owner = cluster.gather(2, order)
    rank = torch.arange(length, device=cluster.device) - first_query.gather(2, owner)
    slot = torch.empty_like(order).scatter_(2, order, first_block.gather(2, owner) * block + rank)

    blocks = int(blocks_end[..., -1].max())
    starts = torch.arange(blocks, device=cluster.device).expand(*cluster.shape[:2], blocks)
    owner_of_block = torch.searchsorted(blocks_end, starts.contiguous(), right=True)
    return BlockLayout(slot, owner_of_block.clamp(max=num_clusters - 1), block)
