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

The members of a cluster share its top keys, so the queries are laid out cluster by cluster in
blocks (:mod:`cast.attention.cluster_blocks`) and each block multiplies its cluster's (k, d)
keys once: no (N, k, d) tensor of keys gathered per query, as the reference's kernels avoid it.

Cost per head: O(N·C·d) centroid attention, O(N·k·d) time and O(N·(k + d)) memory for the top-k
part (the block padding adds about C·T/2 slots, T the block size), plus the clustering; never
N x N.

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
from cast.attention.cluster_blocks import block_attention, block_layout, block_size, take_rows
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
        scale = 1 / math.sqrt(q.shape[-1])
        # In place on the product's own output: its backward does not need it.
        scores = ((centroids * scale) @ k.transpose(-1, -2)).add_(key_padding_bias(mask, q.dtype))
        weights = torch.softmax(scores, dim=-1)
        top_weights, top = weights.topk(self.topk, dim=-1, sorted=False)  # any order: 1.5x faster
        # Where every key is valid (checked on a CPU only: on an accelerator it would synchronise)
        # no top slot needs silencing; a padded key's weight is 0 either way.
        every_key = q.device.type == "cpu" and bool(mask.all())
        top_valid = None if every_key else mask[:, None, None, :].expand_as(weights).gather(-1, top)
        top_mass = (top_weights if every_key else top_weights * top_valid).sum(-1, keepdim=True)
        # Centroid output without the top-k columns, as all columns minus the top ones: no
        # (C, N) copy with the top columns zeroed.
        dropping = self.training and self.dropout
        dropped = F.dropout(weights, self.dropout) if dropping else weights
        top_dropped = dropped.gather(-1, top) if dropping else top_weights
        top_values = take_rows(v, top.flatten(2)).view(*top.shape, -1)
        rest = dropped @ v - (top_dropped.unsqueeze(-2) @ top_values).squeeze(-2)

        layout = block_layout(assignment, self.num_clusters, block_size(q.shape[-2], self.num_clusters))
        silenced = None
        if not every_key:
            silenced = torch.zeros_like(top_valid, dtype=q.dtype).masked_fill_(~top_valid, torch.finfo(q.dtype).min)
        return block_attention(q, k, top_values * top_mass.unsqueeze(-1), rest, top, silenced, layout, scale,
                               self.dropout if self.training else 0.0)
