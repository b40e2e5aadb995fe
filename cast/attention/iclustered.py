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

from cast.attention.base import key_padding_bias, known_unpadded, require_positive
from cast.attention.cluster_blocks import block_attention, block_layout, block_size, row_numbers, take_rows
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
        dropout = self.dropout if self.training else 0.0
        # Where every key is known valid no top slot needs silencing; a padded key's weight is 0
        # either way.
        rest, top_values, top, top_valid = _TopKeys.apply(
            centroids, k, v, None if known_unpadded(mask) else mask, self.topk, scale, dropout)
        silenced = None
        if top_valid is not None:
            silenced = torch.zeros_like(top_valid, dtype=q.dtype).masked_fill_(~top_valid, torch.finfo(q.dtype).min)
        layout = block_layout(assignment, self.num_clusters, block_size(q.shape[-2], self.num_clusters))
        return block_attention(q, k, top_values, rest, top, silenced, layout, scale, dropout)


class _TopKeys(torch.autograd.Function):
    """The centroid part of :meth:`ImprovedClusteredAttention.mix` as one autograd node.

    From the centroids (B, h, C, d), keys and values (B, h, N, d) and the key mask (B, N) (None:
    every key valid): the centroid weights W = softmax(scale · centroids · kᵀ) with padded keys
    at 0, each cluster's ``topk`` keys ``top`` (B, h, C, k) of largest weight and whether each is
    valid (None without a mask), its top mass m̂ (the weight of its valid top keys), the centroid
    output without the top columns, ``rest`` = dropout(W) · v minus the top columns' share
    (B, h, C, d), and the top keys' values times m̂ (B, h, C, k, d).

    One node instead of a dozen: the backward pass writes the weights' gradient once, as
    ``grad_rest`` · vᵀ, with m̂'s gradient scattered over the top columns (there rest's own two
    terms cancel), where autograd would add a zero-filled scatter of the top-k's gradient and the
    gathers' gradients into it, each a pass over the (C, N) weights. It keeps the weights, the
    top keys and the dropout mask; the top values are gathered again.
    """

    @staticmethod
    def forward(ctx, centroids, k, v, mask, topk, scale, dropout):
        # Heads split from a projection are strided views, which matmul would copy on every
        # product, at twice the cost of one contiguous copy (0.55 against 0.06 + 0.19 ms for
        # centroids · kᵀ at 1K, batch 4, 4 heads). The copies are made again in backward, not kept.
        k_, v_ = k.contiguous(), v.contiguous()
        scores = torch.matmul(centroids * scale, k_.transpose(-1, -2))
        if mask is not None:
            scores.add_(key_padding_bias(mask, scores.dtype))  # in place on the product's own output
        weights = torch.softmax(scores, dim=-1)
        del scores
        top_weights, top = weights.topk(topk, dim=-1, sorted=False)  # any order: 1.5x faster
        top_valid = None if mask is None else mask[:, None, None, :].expand_as(weights).gather(-1, top)
        top_mass = (top_weights if top_valid is None else top_weights * top_valid).sum(-1, keepdim=True)
        kept = None
        if dropout:
            dropped = F.dropout(weights, dropout)
            # Where a weight is 0 the mask is lost, but its gradient is multiplied by that 0 anyway.
            kept, top_weights = dropped.ne(0), dropped.gather(-1, top)
        else:
            dropped = weights
        top_values = take_rows(v_, top.flatten(2)).view(*top.shape, -1)
        # Centroid output without the top-k columns, as all columns minus the top ones: no (C, N)
        # copy with the top columns zeroed.
        rest = torch.matmul(dropped, v_).sub_((top_weights.unsqueeze(-2) @ top_values).squeeze(-2))
        del dropped, k_, v_
        ctx.save_for_backward(centroids, k, v, weights, top, top_mass, kept, top_valid)
        ctx.scale, ctx.dropout = scale, dropout
        ctx.mark_non_differentiable(top, *([] if top_valid is None else [top_valid]))
        return rest, top_values * top_mass.unsqueeze(-1), top, top_valid

    @staticmethod
    def backward(ctx, grad_rest, grad_values, _top, _valid):
        centroids, k, v, weights, top, top_mass, kept, top_valid = ctx.saved_tensors
        dtype, d = weights.dtype, v.shape[-1]
        grad_rest, grad_values = grad_rest.to(dtype), grad_values.to(dtype)
        v_ = v.to(dtype).contiguous()
        top_values = take_rows(v_, top.flatten(2)).view(*top.shape, -1)
        grad_mass = (grad_values * top_values).sum((-1, -2))
        dropped = weights if kept is None else weights * kept / (1 - ctx.dropout)
        top_dropped = dropped.gather(-1, top)
        # v: dropped W · grad_rest at every key; at the top keys, minus their share in rest and
        # plus the scaled top values' gradient.
        grad_v = torch.matmul(dropped.transpose(-1, -2), grad_rest)
        del dropped
        at_top = (grad_values * top_mass.unsqueeze(-1)).sub_(top_dropped.unsqueeze(-1) * grad_rest.unsqueeze(-2))
        grad_v.view(-1, d).index_add_(0, row_numbers(grad_v, top.flatten(2)), at_top.view(-1, d))
        del at_top, top_values
        # W: grad_rest · v at every key (through the dropout); at the top keys m̂'s gradient.
        grad_w = torch.matmul(grad_rest, v_.transpose(-1, -2))
        if kept is not None:
            grad_w.mul_(kept).div_(1 - ctx.dropout)
        top_grad = grad_mass.unsqueeze(-1).expand_as(top)
        grad_w.scatter_(-1, top, top_grad if top_valid is None else top_grad * top_valid)
        # softmax backward, w · (g - <g, w>) (autograd's own kernel), times the score scale
        grad_w = torch._softmax_backward_data(grad_w, weights, -1, dtype).mul_(ctx.scale)
        grad_centroids = torch.matmul(grad_w, k.to(dtype).contiguous()).to(centroids.dtype)
        grad_k = torch.matmul(grad_w.transpose(-1, -2), centroids.to(dtype)).to(k.dtype)
        return grad_centroids, grad_k, grad_v.to(v.dtype), None, None, None, None
