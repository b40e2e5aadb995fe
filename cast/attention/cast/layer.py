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
    Attention, check_inputs, linears, option_error, require_choice, require_positive,
)
from cast.attention.cast.blocks import block_attention
from cast.attention.cast.clustering import Clusters, sa_topk_clusters, topk_clusters
from cast.attention.cast.combine import combine, token_rows

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
        q, k, v, gates = linears(x, self.q_proj, self.k_proj, self.v_proj, self.gate)
        gates = torch.sigmoid(gates)  # (B, N, h')
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
        fused = self.summaries_in_attention()
        qc = gather_tokens(q, index, self.surrogates if fused else None)
        kc, vc = gather_tokens(k, index), gather_tokens(v, index)
        summaries = None if fused else self.summarise(k, v, kc, vc, mask, Clusters(index, valid))
        # Only the gathered copies (and weigh_by) are read from here on: dropping q, k, v lowers
        # the peak memory of the pass by what they hold.
        del q, k, v
        intra = self.attend_clusters(qc, kc, vc, valid)
        if fused:
            has_members = valid.any(dim=-1, keepdim=True).to(intra.dtype)
            intra, summaries = _SplitSummaries.apply(intra, has_members)
        return self.output(combine(summaries, intra, clusters, s, weigh_by).transpose(1, 2), mask)

    def summaries_in_attention(self) -> bool:
        """Whether the summaries come out of the intra-cluster attention call: with softmax
        attention, members' summaries and surrogates per head, R_c = Σ_j softmax_j(k_j·s_c/√d) v_j
        is the attention output of the query s_c over the members of c, so each cluster's block
        gets s_c as one more query row (κ + 1 queries, κ keys). That costs the attention next to
        nothing and replaces the summaries' own products, softmax and gradient sums (about 3% of
        a 4K layer step on 2 CPU cores). In training the attention dropout then applies to the
        summary weights as well."""
        return self.attn_fn == "softmax" and self.summaries == "members" and not self.shared_heads

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
        """Attention inside each cluster over its valid slots: queries qc (B, h, Nc, κ or κ + 1, d),
        keys and values (B, h, Nc, κ, d) -> one output per query.

        Outputs at invalid slots, a cluster without a real token included, are finite and left for
        combine() to drop (its member weights are zero there).
        """
        p = self.dropout if self.training else 0.0
        b, h, nc, k, d = kc.shape
        if self.attn_fn == "laplace":
            s = qc @ kc.transpose(-1, -2) / k
            w = 0.5 * (1 + torch.erf((s - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2))))
            w = F.dropout(w * valid.unsqueeze(-2).to(w.dtype), p, self.training)
            return w @ vc
        out = block_attention(qc.reshape(b * h, nc, -1, d), kc.reshape(b * h, nc, k, d),
                              vc.reshape(b * h, nc, k, d), valid.reshape(b * h, nc, k), p)
        return out.view(b, h, nc, -1, d)

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


def gather_tokens(t: Tensor, index: Tensor, surrogates: Tensor | None = None) -> Tensor:
    """Rows of t (B, N, h, d) at index (B, h, Nc, κ) -> (B, h, Nc, κ, d) in one flat row select,
    cheaper than a gather with an expanded index. With ``surrogates`` (h, Nc, d), each cluster's
    surrogate follows its members as slot κ: (B, h, Nc, κ + 1, d)."""
    rows = token_rows(index, t.shape[1])
    if surrogates is None:
        return _Gather.apply(t, rows)
    b, h, nc = index.shape[:3]
    d = t.shape[-1]
    first = t.numel() // d  # the surrogates' rows follow the tokens' in one source
    extra = first + torch.arange(h * nc, device=index.device).view(1, h, nc, 1).expand(b, h, nc, 1)
    source = torch.cat([t.reshape(-1, d), surrogates.reshape(-1, d).to(t.dtype)])
    return _Gather.apply(source, torch.cat([rows, extra], dim=-1))


class _SplitSummaries(torch.autograd.Function):
    """(B, h, Nc, κ + 1, d) attention outputs -> the members' (B, h, Nc, κ, d), a view, and the
    surrogate rows (B, h, Nc, d) times ``keep`` (B, h, Nc, 1), which zeroes the summary of a cluster
    without a real token. The backward pass writes both gradients into one tensor, instead of two
    zero-filled ones that autograd would add."""

    @staticmethod
    def forward(ctx, out, keep):
        ctx.save_for_backward(keep)
        size = out.shape[-2] - 1
        return out[..., :size, :], out[..., size, :] * keep

    @staticmethod
    def backward(ctx, grad_intra, grad_summaries):
        (keep,) = ctx.saved_tensors
        b, h, nc, size, d = grad_intra.shape
        grad = grad_intra.new_empty(b, h, nc, size + 1, d)
        grad[..., :size, :].copy_(grad_intra)
        grad[..., size, :].copy_(grad_summaries * keep)
        return grad, None


class _Gather(torch.autograd.Function):
    """t.reshape(-1, d)[rows]; the backward pass scatters the gradient in whichever of the two
    layouts it arrives in: torch's SDPA backward on the CPU (blocks above cast_blocks.SMALL_BLOCK
    members) returns (B, h, κ, Nc, d)-major gradients, which autograd's own view backward would
    first copy; the chunked block path returns them contiguous."""

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


def cluster_scores(t: Tensor, s: Tensor) -> Tensor:
    """Affinities of t (B, N, h', d') to s (h', Nc, d'), stored (h', Nc, B, N): one bmm over a
    strided (h', d', B·N) view of t, no transposed copy."""
    b, n, groups, width = t.shape
    return torch.bmm(s.to(t.dtype), t.view(b * n, groups, width).permute(1, 2, 0)).view(groups, -1, b, n)
