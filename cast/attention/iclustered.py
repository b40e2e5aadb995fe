"""Improved clustered attention (Vyas et al. 2020), on top of :mod:`clustered`.

Clustering and centroid attention are those of :class:`ClusteredAttention`. Then, per cluster,
the ``topk`` keys with the largest centroid weights are attended exactly by each member query:
with m̂ (``top_mass``) the centroid's attention mass on those keys, query i gives a top key l the
weight m̂ · softmax over the top keys of q_i·k_l/√d, and every other key its centroid weight. It is
computed as (centroid output with the top-k columns zeroed) + m̂ × (exact attention over the
gathered top keys). Each gathered slot carries its own key mask, so when ``topk`` exceeds a row's
valid length the padded keys that fill the surplus slots get no weight. (The reference
implementation masks every head's and cluster's slots with those of head 0, cluster 0, from an
unsorted top-k, so padded keys can leak into, and valid keys drop out of, other clusters.)

With ``topk`` at least the valid length every valid key is a top key, m̂ = 1 and the result is
exact softmax attention, whatever the clustering.

Cost per head: O(N·C·d) centroid attention, O(N·k·d) time and memory for the top-k part (keys and
values are gathered per query), plus the clustering; never N x N.

Exact fallback: sequences of length N ≤ max(num_clusters, topk) get exact softmax attention,
which is then no more expensive (and, for N ≤ topk, is what this mechanism computes anyway).

Shapes: B batch, h heads, N length, d head width, C clusters, k = topk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import key_padding_bias, require_positive
from cast.attention.cluster_blocks import block_layout, block_size
from cast.attention.clustered import ClusteredAttention


class ImprovedClusteredAttention(ClusteredAttention):
    """Clustered attention with exact attention on each cluster's top-k keys.

    Args:
        topk: keys per cluster that each member attends exactly (32 in the paper).
        **kw: the options of :class:`ClusteredAttention` (num_clusters, bits, iterations,
            hash_seed) and of the base class.
    """

    name = "iclustered"

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, topk: int = 32, **kw):
        super().__init__(d_model, n_heads, dropout, **kw)
        require_positive(self.name, topk=topk)
        self.topk = topk

    @property
    def exact_up_to(self) -> int:
        return max(self.num_clusters, self.topk)

    def mix(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, assignment: Tensor, centroids: Tensor
    ) -> Tensor:
        scores = centroids @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = torch.softmax(scores + key_padding_bias(mask, scores.dtype), dim=-1)
        top = weights.topk(self.topk, dim=-1).indices
        top_valid = mask[:, None, None, :].expand_as(weights).gather(-1, top)
        top_mass = (weights.gather(-1, top) * top_valid).sum(-1, keepdim=True)
        rest = F.dropout(weights.scatter(-1, top, 0.0), self.dropout, self.training) @ v

        layout = block_layout(assignment, self.num_clusters, block_size(q.shape[-2], self.num_clusters))
        keys, values = layout.keys(k, top), layout.keys(v, top)
        scores = layout.to_blocks(q) @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~layout.per_block(top_valid).unsqueeze(-2), torch.finfo(scores.dtype).min)
        exact = torch.softmax(scores, dim=-1) * layout.per_block(top_mass).unsqueeze(-1)
        exact = F.dropout(exact, self.dropout, self.training)
        return layout.from_blocks(exact @ values + layout.per_block(rest).unsqueeze(-2))
