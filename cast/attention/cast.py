"""CAST: clustering self-attention with learnable surrogate tokens.

van Engelenhoven, Strisciuglio, Talavera, "CAST: Clustering self-Attention using Surrogate Tokens
for efficient transformers", arXiv 2402.04239 / Pattern Recognition Letters 186 (2024).

Shapes: B batch, h heads, N length, d head width, D = h·d, Nc clusters, κ slots per cluster
(``cluster_size``), h' = 1 with ``shared_heads`` and h otherwise. Paper names map to code names:
surrogate tokens S -> ``surrogates`` (h, Nc, d) or (Nc, D) shared; A_q, A_k -> query and key
affinities ``affinity(q)``, ``affinity(k)`` (B, h', Nc, N), kept cluster-major; gate
W_g -> ``gate``; A_g -> ``affinity(mix)`` with mix = g·q + (1 − g)·k, which equals
g·A_q + (1 − g)·A_k because g is one number per token; I -> ``clusters.index`` (B, h', Nc, κ);
summaries R -> ``summaries`` (B, h, Nc, d); combination weights W -> ``weights`` (B, h', Nc, N).

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
        q, k, v = self.project(x)
        gates = torch.sigmoid(self.gate(x)).transpose(1, 2)  # (B, h', N)
        logits, clusters = self.cluster(q, k, gates, mask)
        if self.record:
            self.remember(clusters, gates, x.shape[0])
        index = clusters.index.expand(x.shape[0], self.n_heads, *clusters.index.shape[2:])
        clusters = Clusters(index, clusters.valid.expand_as(index))
        qc, kc, vc = (gather_tokens(t, index) for t in (q, k, v))
        summaries = self.summarise(k, v, kc, vc, mask, clusters)
        # Only the gathered copies are read from here on; dropping q, k, v (and below the
        # (B, h', Nc, N) logits) lowers the peak memory of the pass by as much as they hold.
        del q, k, v
        mixed = combine(logits, summaries, self.attend_clusters(qc, kc, vc, clusters.valid), clusters)
        del logits
        return self.output(mixed, mask)

    def cluster(self, q: Tensor, k: Tensor, gates: Tensor, mask: Tensor) -> tuple[Tensor, Clusters]:
        """Combination logits (B, h', Nc, N) and the clusters, both from the gated affinity
        (with ``combine_with: query`` the logits are the query affinity)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.combine_with == "affinity"):
            # k + g·(q − k) keeps only q − k for the backward pass; lerp would keep q and k.
            gated = self.affinity(torch.addcmul(k, q - k, gates.unsqueeze(-1)))
        with torch.no_grad():
            # In place and outside autograd: a masked copy of this (B, h', Nc, N) tensor would be
            # the largest allocation. Padded columns receive no gradient anyway (their outputs are
            # zeroed and they are never valid members).
            gated.masked_fill_(~mask[:, None, None, :], torch.finfo(gated.dtype).min)
        cluster_fn = topk_clusters if self.clustering == "topk" else sa_topk_clusters
        clusters = cluster_fn(gated, mask.unsqueeze(1), self.size_for(q.shape[2]))
        return (gated if self.combine_with == "affinity" else self.affinity(q)), clusters

    def scaled_surrogates(self) -> Tensor:
        """S / sqrt(width) as (h, Nc, d): scaling the few surrogates is cheaper than N·Nc scores."""
        if self.shared_heads:
            s = self.surrogates.view(self.num_clusters, self.n_heads, self.d_head).transpose(0, 1)
            return s / math.sqrt(self.qkv_dim)
        return self.surrogates / math.sqrt(self.d_head)

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
        """R_c = Σ_j softmax_j(A_k[j, c]) v_j over members (or all real tokens): (B, h, Nc, d)."""
        if self.summaries == "none":
            return None
        if self.summaries == "all":
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


def token_rows(index: Tensor, n: int, heads_inner: bool) -> Tensor:
    """Flat row of each (b, head, index) in a (B, h, N, ·) tensor stored as (B, N, h, ·) when
    ``heads_inner`` (how split_heads leaves q, k, v) or as (B, h, N, ·) otherwise."""
    b, h = index.shape[:2]
    batch = torch.arange(b, device=index.device).view(b, 1, 1, 1) * (n * h)
    head = torch.arange(h, device=index.device).view(1, h, 1, 1)
    return batch + (index * h + head if heads_inner else head * n + index)


def gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Rows of t (B, h, N, d) at index (B, h, Nc, κ) -> (B, h, Nc, κ, d) in one flat row select,
    cheaper than a gather with an expanded index; q, k, v from split_heads need no copy."""
    b, h, n, d = t.shape
    flat = t.transpose(1, 2).reshape(b * n * h, d)
    return flat.index_select(0, token_rows(index, n, True).reshape(-1)).view(*index.shape, d)


def softmax_over_clusters(logits: Tensor) -> Tensor:
    """softmax(logits, dim=-2) in contiguous passes: torch's softmax over a strided dimension is
    several times slower on the CPU."""
    weights = logits - logits.amax(dim=-2, keepdim=True)
    return weights.exp_().div_(weights.sum(dim=-2, keepdim=True))


def combine(logits: Tensor, summaries: Tensor | None, intra: Tensor, clusters: Clusters) -> Tensor:
    """O_i = Σ_c W[i, c] · (intra_c(i) if i is a member of c else R_c), with W = softmax over
    clusters of ``logits`` (B, h', Nc, N); summaries (B, h, Nc, d) or None (R = 0); intra
    (B, h, Nc, κ, d); clusters.index/valid (B, h, Nc, κ). Returns (B, h, N, d), never N×N."""
    if summaries is None:
        summaries = intra.new_zeros(*intra.shape[:3], intra.shape[-1])
    return _Combine.apply(logits, summaries, intra, clusters.index, clusters.valid)


class _Combine(torch.autograd.Function):
    """W R plus a scatter-add of W[i, c]·(intra_c(i) − R_c) over members, by hand in both passes.

    Autograd would keep W R for the backward pass and allocate three more dense (B, h', Nc, N)
    tensors there (a zero buffer for the member weights' gradient, its sum with W R's, the softmax
    temporary). Here the only one is g = d out / d W: the member share is added to it in place,
    and the softmax backward turns it into d out / d logits in place too.
    """

    @staticmethod
    def forward(ctx, logits, summaries, intra, index, valid):
        b, h, nc, k, d = intra.shape
        n = logits.shape[-1]
        ctx.dtypes = logits.dtype, summaries.dtype
        with torch.autocast(logits.device.type, enabled=False):
            weights = softmax_over_clusters(logits.to(intra.dtype))
            summaries = summaries.to(intra.dtype)
            member_weights = weights.expand(b, h, nc, n).gather(-1, index) * valid
            rows = token_rows(index, n, False).reshape(-1)
            contrib = member_weights.unsqueeze(-1) * (intra - summaries.unsqueeze(-2))
            out = (weights.transpose(-1, -2) @ summaries).reshape(-1, d).index_add_(0, rows, contrib.view(-1, d))
        ctx.save_for_backward(weights, summaries, intra, index, valid, member_weights, rows)
        return out.view(b, h, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        weights, summaries, intra, index, valid, member_weights, rows = ctx.saved_tensors
        b, h, nc, k, d = intra.shape
        grad_out = grad_out.to(intra.dtype).contiguous()
        grad_members = grad_out.view(-1, d).index_select(0, rows).view(b, h, nc, k, d)
        # Σ_d g·(intra − R) without an (intra − R) temporary: the R part is one small matmul.
        grad_member_weights = ((grad_members * intra).sum(-1)
                               - (grad_members @ summaries.unsqueeze(-1)).squeeze(-1)) * valid
        grad_intra = grad_members.mul_(member_weights.unsqueeze(-1))
        grad_summaries = weights @ grad_out - grad_intra.sum(dim=-2)
        if weights.shape[1] < h:  # shared heads: one W and one index for all heads
            grad_weights = torch.einsum("bhcd,bhnd->bcn", summaries, grad_out).unsqueeze(1)
            grad_member_weights, index = grad_member_weights.sum(1, keepdim=True), index[:, :1]
        else:
            grad_weights = summaries @ grad_out.transpose(-1, -2)
        # Softmax backward over clusters, in place in g: W ⊙ g − W ⊙ Σ_c (W ⊙ g).
        grad_logits = grad_weights.scatter_add_(-1, index, grad_member_weights).mul_(weights)
        grad_logits.addcmul_(weights, grad_logits.sum(dim=-2, keepdim=True), value=-1)
        logits_dtype, summaries_dtype = ctx.dtypes
        return grad_logits.to(logits_dtype), grad_summaries.to(summaries_dtype), grad_intra, None, None
