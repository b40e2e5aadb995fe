"""Clustered attention: Vyas, Katharopoulos, Fleuret, "Fast Transformers with Clustered
Attention", NeurIPS 2020 (arXiv 2007.04825); reference code idiap/fast-transformers.

Queries are hashed and grouped into C clusters by K-means in Hamming space
(:mod:`cast.attention.hamming`, no gradient). Each cluster's centroid, the mean of its member
queries (the gradient flows back to the members), attends to every valid key with exact softmax,
and each query receives its centroid's output. The paper's Q^c is ``centroids``, its clustering
S is ``assignment`` and its A^c is ``weights``.

Cost per head: O(N·C·d) for the centroid attention plus O(iterations·N·C·b) for the
clustering; memory O(N·C) (the (B, h, C, N) centroid weights), never N x N.

Exact fallback: a sequence whose (padded) length N is at most ``num_clusters`` gains nothing from
clustering (C·N ≥ N²), so it gets exact softmax attention through torch's fused kernel. A row with
fewer valid queries than clusters leaves the surplus clusters empty, so the number of clusters in
use never exceeds the valid length.

Hash planes are drawn afresh at every training call; in eval they are fixed, drawn once from
``hash_seed``, so that evaluation is deterministic.

Shapes: B batch, h heads, N length, d head width, C clusters, b bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, key_padding_bias, require_positive
from cast.attention.cluster_blocks import take_rows
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
        members = memberships(assignment, self.num_clusters, q.dtype)
        sizes = members.sum(2).clamp_min(1).unsqueeze(-1)
        centroids = members.transpose(-1, -2) @ q / sizes
        scores = centroids @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = torch.softmax(scores + key_padding_bias(mask, scores.dtype), dim=-1)
        return self.mix(q, k, v, mask, assignment, weights)

    def mix(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, assignment: Tensor, weights: Tensor
    ) -> Tensor:
        """Outputs (B, h, N, d) from the centroid weights (B, h, C, N): each query takes its centroid's."""
        return per_query(F.dropout(weights, self.dropout, self.training) @ v, assignment)

    @torch.no_grad()
    def cluster(self, q: Tensor, mask: Tensor) -> Tensor:
        """Cluster index (B, h, N) of every query, -1 on padded ones."""
        planes = torch.randn_like(self.planes) if self.training else self.planes
        # Codes and votes are small integers: keep them in float32 whatever autocast says.
        with torch.autocast(q.device.type, enabled=False):
            codes = hash_codes(q.float(), planes.float())
            return hamming_kmeans(codes, mask, self.num_clusters, self.iterations)[0]


def memberships(assignment: Tensor, num_clusters: int, dtype: torch.dtype) -> Tensor:
    """One-hot (B, h, N, C) of ``assignment`` (B, h, N); unassigned queries (-1) get a zero row."""
    clusters = torch.arange(num_clusters, device=assignment.device)
    return (assignment.unsqueeze(-1) == clusters).to(dtype)


def per_query(t: Tensor, assignment: Tensor) -> Tensor:
    """Each query's row of its cluster: t (B, h, C, X) -> (B, h, N, X).

    Padded queries (-1) read cluster 0; their outputs are zeroed downstream.
    """
    return take_rows(t, assignment.clamp(min=0))
