"""Clustered attention: Vyas, Katharopoulos, Fleuret, "Fast Transformers with Clustered
Attention", NeurIPS 2020 (arXiv 2007.04825); reference code idiap/fast-transformers.

Queries are hashed and grouped into C clusters by K-means in Hamming space
(:mod:`cast.attention.hamming`, no gradient). Each cluster's centroid, the mean of its member
queries (the gradient flows back to the members), attends to every valid key with exact softmax,
and each query receives its centroid's output. The paper's Q^c is ``centroids`` and its
clustering S is ``assignment``; its A^c, the (C, N) centroid weights, stays inside torch's fused
attention kernel.

Cost per head: O(N·C·d) for the centroid attention plus O(iterations·N·(C + b)) for the
clustering (table sums, see :mod:`cast.attention.hamming`); memory O(N·(d + b)), never N x N.

Exact fallback: a sequence whose (padded) length N is at most ``num_clusters`` gains nothing from
clustering (C·N ≥ N²), so it gets exact softmax attention through torch's fused kernel. A row with
fewer valid queries than clusters leaves the surplus clusters empty, so the number of clusters in
use never exceeds the valid length.

Hash planes are drawn afresh at every training call; in eval they are fixed, drawn once from
``hash_seed``, so that evaluation is deterministic.

Shapes: B batch, h heads, N length, d head width, C clusters, b bits.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, require_positive
from cast.attention.cluster_blocks import in_storage_order, row_numbers, shaped_like, stored_rows, take_rows
from cast.attention.hamming import hamming_kmeans, hash_codes


class ClusteredAttention(Attention):
    """Attention through cluster centroids.

    Args:
        num_clusters: clusters C per (batch, head).
        bits: hash bits b (63 in the paper; any count works, codes are ±1 floats).
        iterations: K-means assignment steps (Lloyd iterations).
        hash_seed: seed of the fixed hash planes used in eval.
    """

    name = "clustered"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        num_clusters: int = 32,
        bits: int = 63,
        iterations: int = 10,
        hash_seed: int = 0,
        **kw,
    ):
        super().__init__(d_model, n_heads, dropout, **kw)
        require_positive(self.name, num_clusters=num_clusters, bits=bits, iterations=iterations)
        self.num_clusters, self.iterations = num_clusters, iterations
        generator = torch.Generator().manual_seed(hash_seed)
        planes = torch.randn(self.d_head + 1, bits, generator=generator)
        self.register_buffer("planes", planes, persistent=False)

    @property
    def exact_up_to(self) -> int:
        """Longest sequence length that gets exact attention instead of clustering."""
        return self.num_clusters

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if q.shape[-2] <= self.exact_up_to:
            drop = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=drop)
        assignment = self.cluster(q, mask)
        centroids = centroid_means(q, assignment, self.num_clusters)
        return self.mix(q, k, v, mask, assignment, centroids)

    def mix(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, assignment: Tensor, centroids: Tensor
    ) -> Tensor:
        """Outputs (B, h, N, d) from the centroids (B, h, C, d): each query takes its centroid's
        exact attention output (torch's fused kernel: the (C, N) weights are never stored)."""
        drop = self.dropout if self.training else 0.0
        key_mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(centroids, k, v, attn_mask=key_mask, dropout_p=drop)
        return per_query(out, assignment, like=q)

    @torch.no_grad()
    def cluster(self, q: Tensor, mask: Tensor) -> Tensor:
        """Cluster index (B, h, N) of every query, -1 on padded ones."""
        planes = torch.randn_like(self.planes) if self.training else self.planes
        # Codes and votes are small integers: keep them in float32 whatever autocast says.
        with torch.autocast(q.device.type, enabled=False):
            codes = hash_codes(q.float(), planes.float())
            return hamming_kmeans(codes, mask, self.num_clusters, self.iterations)[0]


def centroid_means(q: Tensor, assignment: Tensor, num_clusters: int) -> Tensor:
    """Mean (B, h, C, d) of each cluster's member queries; zeros for an empty cluster.

    One ``index_add`` of the query rows (padded queries go to a spare cluster that is dropped):
    5x faster forward and backward than the one-hot (C, N) @ (N, d) product.
    """
    b, h, n, d = q.shape
    slots = num_clusters + 1
    cluster = assignment.masked_fill(assignment < 0, num_clusters)
    flat = in_storage_order(cluster + slots * torch.arange(b * h, device=q.device).view(b, h, 1), q)
    sums = q.new_zeros(b * h * slots, d).index_add(0, flat, stored_rows(q))
    sizes = q.new_zeros(b * h * slots).index_add_(0, flat, q.new_ones(flat.shape))
    means = sums / sizes.clamp_min(1).unsqueeze(-1)
    return means.view(b, h, slots, d)[:, :, :num_clusters]


def per_query(t: Tensor, assignment: Tensor, like: Tensor | None = None) -> Tensor:
    """Each query's row of its cluster: t (B, h, C, X) -> (B, h, N, X).

    Padded queries (-1) read cluster 0; their outputs are zeroed downstream. With ``like``
    (B, h, N, ·) the result is laid out as ``like`` is stored (heads split from a projection:
    merging the heads back is then a view, not a copy).
    """
    if like is None:
        return take_rows(t, assignment.clamp(min=0))
    index = in_storage_order(row_numbers(t, assignment.clamp(min=0)).view(assignment.shape), like)
    return shaped_like(stored_rows(t).index_select(0, index), like)
