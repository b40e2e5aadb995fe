"""FAST / Fastmax: Gerami, Hoover, Dulepet, Duraiswami, "FAST: Factorizable Attention for
Speeding up Transformers", arXiv 2402.07901; authors' code armingerami/reproducing_fastmax_results.

Softmax's exponential is replaced by its Taylor polynomial f(s) = 1 + s (p = 1) or
1 + s + s²/2 (p = 2), applied to scores s = q·k of normalised queries and keys: per (batch, head)
each token is centred over its features, then all tokens are divided by the largest norm among
the valid ones, so |s| ≤ 1 (and f > 0 for p = 2). Weights are f(s_ij) / Σ_n f(s_in) over valid keys.

Because f is a polynomial, the sums over keys factorise (the paper's F numerator and g
denominator):
    numerator_i   = Σ_j v_j + q_iᵀ (Σ_j k_j v_jᵀ) + ½ (q_i ⊗ q_i)ᵀ (Σ_j (k_j ⊗ k_j) v_jᵀ)
    denominator_i = n     + q_iᵀ (Σ_j k_j)     + ½ (q_i ⊗ q_i)ᵀ (Σ_j k_j ⊗ k_j)
with n the number of valid keys; padded keys are zeroed before every sum. Cost per head
O(N·d^(p+1)) time and O(N·d^p) memory (the k⊗k and q⊗q factors); the N x N matrix never exists.

Dropout acts on the key-side factors of the numerator: each (head, key) is dropped with the
given probability and the survivors scaled up, which is standard attention dropout with one mask
per key column shared by all queries. The output stays unbiased and the denominator positive.
(The authors drop individual feature entries of the q and k factors instead.)

Shapes: B batch, h heads, N length, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, require_choice

ORDERS = (1, 2)
# Smallest largest-norm and denominator: keeps a degenerate head (all tokens equal, or p = 1
# with every score at -1) finite instead of dividing by zero.
TINY = 1e-6


class FastmaxAttention(Attention):
    """Factorised polynomial attention.

    Args:
        p: order of the Taylor polynomial replacing exp (1 or 2).
    """

    name = "fastmax"

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, p: int = 2, **kw):
        super().__init__(d_model, n_heads, dropout, **kw)
        self.p = require_choice(self.name, "p", p, ORDERS)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        real = mask[:, None, :, None].to(q.dtype)
        q, k = normalise(q, mask) * real, normalise(k, mask) * real
        keep = F.dropout(real.expand(*v.shape[:3], 1), self.dropout, self.training)
        v = v * keep
        count = mask.sum(-1).to(q.dtype)[:, None, None]

        numerator = v.sum(2, keepdim=True) + torch.einsum(
            "bhnd,bhde->bhne", q, torch.einsum("bhnd,bhne->bhde", k, v)
        )
        denominator = count + torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
        if self.p == 2:
            kkv = torch.einsum("bhnd,bhnf,bhne->bhdfe", k, k, v)
            numerator = numerator + torch.einsum("bhnd,bhnf,bhdfe->bhne", q, q, kkv) / 2
            kk = torch.einsum("bhnd,bhnf->bhdf", k, k)
            denominator = denominator + torch.einsum("bhnd,bhnf,bhdf->bhn", q, q, kk) / 2
        return numerator / denominator.clamp_min(TINY).unsqueeze(-1)


def normalise(t: Tensor, mask: Tensor) -> Tensor:
    """Centre each token of t (B, h, N, d) over its features, then divide by the largest norm
    among the valid tokens of its (batch, head), so every valid token has norm at most 1."""
    t = t - t.mean(-1, keepdim=True)
    squared = (t * t).sum(-1).masked_fill(~mask[:, None, :], 0.0)
    largest = squared.amax(-1).clamp_min(TINY * TINY).sqrt()
    return t / largest[..., None, None]
