"""CAST's combination step: each token's output from the clusters it belongs to and the
summaries of the others, weighted by a softmax over clusters of its surrogate affinities.

Shapes as in :mod:`cast.attention.cast`: B batch, h heads, h' = 1 with shared heads and h
otherwise, d' = D / h', N tokens, Nc clusters, κ slots per cluster, d head width. q, k, v and mix
are in the projections' (B, N, h, d) layout, which :func:`token_rows` addresses row by row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cast.attention.cast.clustering import Clusters


def token_rows(index: Tensor, n: int) -> Tensor:
    """Flat row of each (b, head, index) in a (B, N, h, ·) tensor, the layout of the projections."""
    b, h = index.shape[:2]
    batch = torch.arange(b, device=index.device).view(b, 1, 1, 1) * (n * h)
    return batch + index * h + torch.arange(h, device=index.device).view(1, h, 1, 1)


def combine(summaries: Tensor | None, intra: Tensor, clusters: Clusters, s: Tensor, mix: Tensor) -> Tensor:
    """O_i = Σ_c W[i, c] · (intra_c(i) if i is a member of c else R_c), W = softmax over clusters
    of the affinities of mix (B, N, h', d') to the scaled surrogates s (h', Nc, d').

    summaries (B, h, Nc, d) or None (R = 0); intra (B, h, Nc, κ, d); clusters.index/valid
    (B, h', Nc, κ). Returns (B, N, h, d). Never N×N, and no (B, h', N, Nc) tensor is held whole
    (see _Combine).
    """
    if summaries is None:
        summaries = intra.new_zeros(*intra.shape[:3], intra.shape[-1])
    return _Combine.apply(summaries, intra, s, mix, clusters.index, clusters.valid)


# Batch rows per pass of _Combine: its (rows·N, Nc) affinities and weights of one group of heads
# hold about this many elements, few enough to stay in a CPU core's cache (1 MiB in float32).
CHUNK_ELEMENTS = 2**18


def row_chunks(b: int, per_row: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(i, min(i + step, b)) for i in range(0, b, step)]


def per_group(t: Tensor, groups: int) -> list[Tensor]:
    """(m, N, h, d) -> per group of heads the strided (m, N, h/h'·d) view, no copy."""
    m, n, h, d = t.shape
    return list(t.view(m, n, groups, h // groups * d).unbind(2))


def group_summaries(r: Tensor, groups: int) -> list[Tensor]:
    """(m, h, Nc, d) -> per group of heads (m, Nc, h/h'·d); a view when each group is one head."""
    m, h, nc, d = r.shape
    r = r.view(m, groups, h // groups, nc, d)
    return [r[:, g].transpose(1, 2).reshape(m, nc, -1) for g in range(groups)]


class _Combine(torch.autograd.Function):
    """W R plus a scatter-add of W[i, c]·(intra_c(i) − R_c) over members, by hand in both passes.

    Everything stays in the projections' (B, N, h', d') layout. For a few batch rows and one
    group of heads at a time (CHUNK_ELEMENTS), the affinities are one matmul over a strided
    (rows·N, d') view of mix, token-major, so the softmax over clusters and its backward run over
    contiguous rows that stay in cache, and the products with R write straight into the output's
    columns of those heads. W is never saved: the backward pass recomputes it chunk by chunk and
    turns d out / d W into d out / d mix at once, so no (B, h', N, Nc) tensor lives across the
    layer and the gradients of q, k and the gate come out in the projections' layout.
    """

    @staticmethod
    def forward(ctx, summaries, intra, s, mix, index, valid):
        b, h, nc, size, d = intra.shape
        n, groups = mix.shape[1], mix.shape[2]
        ctx.dtypes = summaries.dtype, s.dtype, mix.dtype
        with torch.autocast(intra.device.type, enabled=False):
            s, mix, summaries = s.to(intra.dtype), mix.to(intra.dtype), summaries.to(intra.dtype)
            slots = index * nc + torch.arange(nc, device=index.device).view(nc, 1)
            out = intra.new_empty(b, n, h, d)
            member_weights = intra.new_empty(index.shape)
            for rows in row_chunks(b, n * nc):
                per_chunk = zip(s, per_group(mix[rows], groups), group_summaries(summaries[rows], groups),
                                per_group(out[rows], groups), slots[rows].unbind(1), member_weights[rows].unbind(1))
                for s_g, mix_g, r, o, slot, picked in per_chunk:
                    weights = cluster_weights(mix_g, s_g)  # (m, N, Nc)
                    matmul_into(weights, r, o)
                    picked.copy_(weights.view(len(weights), -1).gather(-1, slot.flatten(1)).view_as(picked))
            member_weights.mul_(valid)
            rows_all = token_rows(index.expand(b, h, nc, size), n).reshape(-1)
            contrib = (intra - summaries.unsqueeze(-2)).mul_(member_weights.unsqueeze(-1))
            out.view(-1, d).index_add_(0, rows_all, contrib.view(-1, d))
        ctx.save_for_backward(summaries, intra, s, mix, slots, valid, member_weights, rows_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        summaries, intra, s, mix, slots, valid, member_weights, rows_all = ctx.saved_tensors
        b, h, nc, size, d = intra.shape
        n, groups = mix.shape[1], mix.shape[2]
        grad_out = grad_out.to(intra.dtype).contiguous()
        grad_members = grad_out.view(-1, d).index_select(0, rows_all).view(b, h, nc, size, d)
        # Σ_d g·(intra − R) without an (intra − R) temporary: the R part is one small matmul.
        grad_member_weights = (torch.einsum("...kd,...kd->...k", grad_members, intra)
                               - (grad_members @ summaries.unsqueeze(-1)).squeeze(-1))
        if groups < h:  # shared heads: one W and one index for all heads
            grad_member_weights = grad_member_weights.sum(1, keepdim=True)
        grad_member_weights.mul_(valid)
        grad_intra = grad_members.mul_(member_weights.unsqueeze(-1))
        grad_summaries = grad_intra.sum(dim=-2).neg_()
        grad_mix, grad_s = torch.empty_like(mix), torch.zeros_like(s)
        for rows in row_chunks(b, n * nc):
            m = rows.stop - rows.start
            per_chunk = zip(s, grad_s, per_group(mix[rows], groups), per_group(grad_mix[rows], groups),
                            group_summaries(summaries[rows], groups), per_group(grad_out[rows], groups),
                            grad_summaries[rows].view(m, groups, -1, nc, d).unbind(1),
                            slots[rows].unbind(1), grad_member_weights[rows].unbind(1))
            for s_g, grad_s_g, mix_g, grad_mix_g, r, go, gr, slot, gmw in per_chunk:
                weights = cluster_weights(mix_g, s_g)
                grad_weights = torch.bmm(go, r.transpose(1, 2))
                gr.add_(torch.bmm(weights.transpose(1, 2), go).view(m, nc, -1, d).transpose(1, 2))
                grad_weights.view(m, -1).scatter_add_(-1, slot.flatten(1), gmw.flatten(1))
                grad_logits = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
                grad_logits = grad_logits.view(-1, nc)
                matmul_into(grad_logits, s_g, grad_mix_g.flatten(0, 1))
                grad_s_g.addmm_(grad_logits.t(), mix_g.flatten(0, 1))
        summaries_dtype, s_dtype, mix_dtype = ctx.dtypes
        return (grad_summaries.to(summaries_dtype), grad_intra, grad_s.to(s_dtype), grad_mix.to(mix_dtype),
                None, None)


def matmul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out ← a @ b (matrices or batches of them), written straight into the strided ``out`` in
    eager mode; torch.compile refuses a strided out=, so there it is a copy."""
    if torch.compiler.is_compiling():
        out.copy_(a @ b)
    else:
        (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)


def cluster_weights(mix: Tensor, s: Tensor) -> Tensor:
    """W = softmax over clusters of the affinities of mix (m, N, d'), one group of heads, to its
    surrogates s (Nc, d'): (m, N, Nc), token-major, so the softmax runs over contiguous rows."""
    m, n, width = mix.shape
    return torch.softmax(mix.flatten(0, 1) @ s.t(), dim=-1).view(m, n, -1)
