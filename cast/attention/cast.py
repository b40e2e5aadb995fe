"""CAST: clustering self-attention with learnable surrogate tokens.

van Engelenhoven, Strisciuglio, Talavera, "CAST: Clustering self-Attention using Surrogate Tokens
for efficient transformers", arXiv 2402.04239 / Pattern Recognition Letters 186 (2024).

Shapes: B batch, h heads, N length, d head width, D = h·d, Nc clusters, κ slots per cluster
(``cluster_size``), h' = 1 with ``shared_heads`` and h otherwise. Paper names map to code names:
surrogate tokens S -> ``surrogates`` (h, Nc, d) or (Nc, D) shared; A_q, A_k -> query and key
affinities ``affinity(q)``, ``affinity(k)`` (B, h', Nc, N); gate W_g -> ``gate``; A_g -> the
affinities of mix = g·q + (1 − g)·k, which equals g·A_q + (1 − g)·A_k because g is one number per
token: cluster-major in ``cluster`` (for the top-k), token-major in ``combine``; I ->
``clusters.index`` (B, h', Nc, κ); summaries R -> ``summaries`` (B, h, Nc, d); combination
weights W -> ``cluster_weights``, (rows, N, Nc) for a few batch rows and one group of heads at a
time, never held whole. q, k, v stay in the projections' (B, N, h, d) layout throughout.

Per token i: O_i = Σ_c W[i, c] · (intra-cluster output of i in c if i is a member of c, else
R_c), computed as W R plus a scatter-add of W[i, c]·(intra_c(i) − R_c) over members. Cost:
O(N·Nc·d) for affinities, summaries and combination, O(Nc·κ²·d) inside the clusters; no N×N
tensor exists. What follows the paper and what is this project's reading is listed in the
README (section CAST); every reading is an option here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cast.attention.base import (
    Attention, check_inputs, option_error, require_choice, require_positive,
)
from cast.attention.cast_clustering import Clusters, sa_topk_clusters, topk_clusters

CLUSTERINGS = ("topk", "sa_topk")
ATTN_FNS = ("softmax", "laplace")
SUMMARIES = ("members", "all", "none")
COMBINE_WITH = ("affinity", "query")
# Laplace attention function of Mega (Ma et al., 2022): mean and width of its Gaussian CDF.
LAPLACE_MU, LAPLACE_SIGMA = math.sqrt(0.5), math.sqrt(1.0 / (4 * math.pi))


class CASTAttention(Attention):
    """Clustered attention around learnable surrogate tokens (see the module docstring).

    Args:
        num_clusters: Nc, one surrogate token per cluster.
        cluster_size: κ, tokens per cluster; ``"auto"`` is ceil(N / Nc), enough to cover N.
        clustering: ``topk`` (each cluster takes its κ best tokens) or ``sa_topk`` (each token
            in at most one cluster).
        attn_fn: ``softmax`` or ``laplace`` attention inside each cluster.
        summaries: cluster summaries from the cluster's ``members``, from ``all`` tokens, or
            ``none`` (no summaries: tokens only receive the clusters they are members of).
        combine_with: combination weights from the gated affinity (``affinity``) or from the
            query affinity (``query``, in which case the gate receives no gradient).
        shared_heads: one set of surrogates, one gate and one clustering for all heads.

    Set ``record = True`` to keep the last cluster indices (``last_clusters``: index and valid,
    (B, h, Nc, κ)) and gates (``last_gates``, (B, h, N)) on the CPU for inspection.
    """

    name = "cast"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        num_clusters: int = 32,
        cluster_size: int | str = "auto",
        clustering: str = "topk",
        attn_fn: str = "softmax",
        summaries: str = "members",
        combine_with: str = "affinity",
        shared_heads: bool = False,
        **kw,
    ):
        super().__init__(d_model, n_heads, dropout, **kw)
        require_positive(self.name, num_clusters=num_clusters)
        positive = type(cluster_size) is int and cluster_size > 0
        if cluster_size != "auto" and not positive:
            raise option_error(self.name, "cluster_size", cluster_size, 'a positive integer or "auto"')
        if not isinstance(shared_heads, bool):
            raise option_error(self.name, "shared_heads", shared_heads, "true or false")
        self.num_clusters, self.cluster_size = num_clusters, cluster_size
        self.shared_heads = shared_heads
        self.clustering = require_choice(self.name, "clustering", clustering, CLUSTERINGS)
        self.attn_fn = require_choice(self.name, "attn_fn", attn_fn, ATTN_FNS)
        self.summaries = require_choice(self.name, "summaries", summaries, SUMMARIES)
        self.combine_with = require_choice(self.name, "combine_with", combine_with, COMBINE_WITH)
        shape = (num_clusters, self.qkv_dim) if shared_heads else (n_heads, num_clusters, self.d_head)
        self.surrogates = nn.Parameter(torch.randn(shape))
        self.gate = nn.Linear(d_model, 1 if shared_heads else n_heads)
        self.record = False
        self.last_clusters: Clusters | None = None
        self.last_gates: Tensor | None = None

    def size_for(self, n: int) -> int:
        """κ for a sequence of padded length n (never more than n)."""
        size = math.ceil(n / self.num_clusters) if self.cluster_size == "auto" else self.cluster_size
        return min(size, n)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask)
        b, n, _ = x.shape
        groups = 1 if self.shared_heads else self.n_heads  # h'
        # The projections as (B, N, D): every view below reads them in place, no head split copy.
        q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        gates = torch.sigmoid(self.gate(x))  # (B, N, h')
        s = self.affinity_weights()
        q_groups, k_groups = q.view(b, n, groups, -1), k.view(b, n, groups, -1)  # (B, N, h', d')
        if self.combine_with == "affinity":
            mix = gated_mix(q_groups, k_groups, gates)
            weigh_by = mix
        else:  # the query affinity weighs the clusters; the gate only steers the clustering
            with torch.no_grad():
                mix = gated_mix(q_groups, k_groups, gates)
            weigh_by = q_groups
        clusters = self.cluster(mix, s, mask)
        del mix, q_groups, k_groups
        if self.record:
            self.remember(clusters, gates.transpose(1, 2), b)
        index = clusters.index.expand(b, self.n_heads, *clusters.index.shape[2:])
        valid = clusters.valid.expand_as(index)
        q, k, v = (t.view(b, n, self.n_heads, self.d_head) for t in (q, k, v))  # (B, N, h, d)
        qc, kc, vc = (gather_tokens(t, index) for t in (q, k, v))
        summaries = self.summarise(k, v, kc, vc, mask, Clusters(index, valid))
        # Only the gathered copies (and mix) are read from here on: dropping q, k, v lowers the
        # peak memory of the pass by what they hold.
        del q, k, v
        intra = self.attend_clusters(qc, kc, vc, valid)
        return self.output(combine(summaries, intra, clusters, s, weigh_by).transpose(1, 2), mask)

    @torch.no_grad()
    def cluster(self, mix: Tensor, s: Tensor, mask: Tensor) -> Clusters:
        """Clusters (index and valid, (B, h', Nc, κ)) from the affinities of mix (B, N, h', d') to
        the scaled surrogates s (h', Nc, d'); no gradient."""
        b, n = mix.shape[:2]
        scores = cluster_scores(mix, s)  # (h', Nc, B, N)
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        cluster_fn = topk_clusters if self.clustering == "topk" else sa_topk_clusters
        index, valid = cluster_fn(scores.permute(2, 0, 1, 3), mask.unsqueeze(1), self.size_for(n))
        return Clusters(index.contiguous(), valid.contiguous())

    def affinity_weights(self) -> Tensor:
        """S / sqrt(width) as (h', Nc, d') for the token affinities of :meth:`cluster` and
        :func:`combine`: (h, Nc, d) per head, (1, Nc, D) with ``shared_heads``; scaling the few
        surrogates is cheaper than the N·Nc scores."""
        if self.shared_heads:
            return (self.surrogates / math.sqrt(self.qkv_dim)).unsqueeze(0)
        return self.surrogates / math.sqrt(self.d_head)

    def scaled_surrogates(self) -> Tensor:
        """:meth:`affinity_weights` per head, (h, Nc, d), shared ones split along D."""
        s = self.affinity_weights()
        return s[0].view(self.num_clusters, self.n_heads, self.d_head).transpose(0, 1) if self.shared_heads else s

    def affinity(self, t: Tensor) -> Tensor:
        """Scaled similarity of every token of t (B, h, N, d) to every surrogate: (B, h', Nc, N)."""
        s = self.scaled_surrogates()
        if self.shared_heads:
            return torch.einsum("hcd,bhnd->bcn", s, t).unsqueeze(1)
        return s @ t.transpose(-1, -2)

    def member_affinity(self, tc: Tensor) -> Tensor:
        """Like :meth:`affinity` for gathered members tc (B, h, Nc, κ, d) of their own cluster."""
        s = self.scaled_surrogates()
        if self.shared_heads:
            return torch.einsum("hcd,bhckd->bck", s, tc).unsqueeze(1)
        return (tc @ s.unsqueeze(-1)).squeeze(-1)

    def attend_clusters(self, qc: Tensor, kc: Tensor, vc: Tensor, valid: Tensor) -> Tensor:
        """Attention inside each cluster over its valid slots: (B, h, Nc, κ, d) -> same shape.

        Outputs at invalid slots, a cluster without a real token included, are finite and left for
        combine() to drop (its member weights are zero there).
        """
        p = self.dropout if self.training else 0.0
        b, h, nc, k, d = qc.shape
        if self.attn_fn == "laplace":
            s = qc @ kc.transpose(-1, -2) / k
            w = 0.5 * (1 + torch.erf((s - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2))))
            w = F.dropout(w * valid.unsqueeze(-2).to(w.dtype), p, self.training)
            return w @ vc
        # SDPA returns NaN for a query with no key, so an empty cluster attends over its padding
        # slots: finite values that combine() never reads.
        empty = ~valid.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(
            qc.reshape(b * h, nc, k, d), kc.reshape(b * h, nc, k, d), vc.reshape(b * h, nc, k, d),
            attn_mask=(valid | empty).reshape(b * h, nc, 1, k), dropout_p=p,
        )
        return out.view(b, h, nc, k, d)

    def summarise(self, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, mask: Tensor,
                  clusters: Clusters) -> Tensor | None:
        """R_c = Σ_j softmax_j(A_k[j, c]) v_j over members (or all real tokens): (B, h, Nc, d).
        k, v are (B, N, h, d); kc, vc their gathered members (B, h, Nc, κ, d)."""
        if self.summaries == "none":
            return None
        if self.summaries == "all":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            scores, keep = self.affinity(k), mask[:, None, None, :]
        else:
            scores, keep = self.member_affinity(kc), clusters.valid
        # A finite fill keeps a cluster without real members at zero instead of NaN.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        w = (torch.softmax(scores, dim=-1) * keep).to(v.dtype)
        if self.summaries == "all":
            return w @ v
        return (w.unsqueeze(-2) @ vc).squeeze(-2)

    def remember(self, clusters: Clusters, gates: Tensor, b: int) -> None:
        shape = (b, self.n_heads, *clusters.index.shape[2:])
        self.last_clusters = Clusters(
            clusters.index.detach().expand(shape).cpu(), clusters.valid.detach().expand(shape).cpu()
        )
        self.last_gates = gates.detach().expand(b, self.n_heads, -1).float().cpu()


def token_rows(index: Tensor, n: int) -> Tensor:
    """Flat row of each (b, head, index) in a (B, N, h, ·) tensor, the layout of the projections."""
    b, h = index.shape[:2]
    batch = torch.arange(b, device=index.device).view(b, 1, 1, 1) * (n * h)
    return batch + index * h + torch.arange(h, device=index.device).view(1, h, 1, 1)


def gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Rows of t (B, N, h, d) at index (B, h, Nc, κ) -> (B, h, Nc, κ, d) in one flat row select,
    cheaper than a gather with an expanded index."""
    return _Gather.apply(t, token_rows(index, t.shape[1]))


class _Gather(torch.autograd.Function):
    """t.reshape(-1, d)[rows]; the backward pass scatters the gradient in whichever of the two
    layouts it arrives in: SDPA's backward on the CPU returns (B, h, κ, Nc, d)-major gradients,
    which autograd's own view backward would first copy."""

    @staticmethod
    def forward(ctx, t, rows):
        ctx.save_for_backward(rows)
        ctx.shape = t.shape
        return t.reshape(-1, t.shape[-1]).index_select(0, rows.reshape(-1)).view(*rows.shape, t.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        d = grad.shape[-1]
        if not grad.is_contiguous() and grad.transpose(-2, -3).is_contiguous():
            grad, rows = grad.transpose(-2, -3), rows.transpose(-1, -2)
        out = grad.new_zeros(ctx.shape)
        out.view(-1, d).index_add_(0, rows.reshape(-1), grad.contiguous().view(-1, d))
        return out, None


def gated_mix(q: Tensor, k: Tensor, gates: Tensor) -> Tensor:
    """mix = k + g·(q − k) for q, k (B, N, h', d') and gates (B, N, h'); its affinities are
    g·A_q + (1 − g)·A_k."""
    return _Mix.apply(q, k, gates)


class _Mix(torch.autograd.Function):
    """k + g·(q − k), keeping only q − k and g for the backward pass (lerp keeps q and k), whose
    gradients come in three passes: g·grad, grad − g·grad, and Σ_d grad·(q − k)."""

    @staticmethod
    def forward(ctx, q, k, gates):
        diff = q - k
        ctx.save_for_backward(diff, gates)
        return torch.addcmul(k, diff, gates.unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad):
        diff, gates = ctx.saved_tensors
        grad_q = grad * gates.unsqueeze(-1)
        grad_gates = torch.einsum("...d,...d->...", grad, diff)
        return grad_q, grad - grad_q, grad_gates


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


def cluster_scores(t: Tensor, s: Tensor) -> Tensor:
    """Affinities of t (B, N, h', d') to s (h', Nc, d'), stored (h', Nc, B, N): one bmm over a
    strided (h', d', B·N) view of t, no transposed copy."""
    b, n, groups, width = t.shape
    return torch.bmm(s.to(t.dtype), t.view(b * n, groups, width).permute(1, 2, 0)).view(groups, -1, b, n)


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
