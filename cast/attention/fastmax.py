"""FAST / Fastmax: Gerami, Hoover, Dulepet, Duraiswami, "FAST: Factorizable Attention for
Speeding up Transformers", arXiv 2402.07901; authors' code armingerami/reproducing_fastmax_results
(later armingerami/Fastmax).

Softmax's exponential is replaced by a polynomial of the score, by default its Taylor
polynomial f(s) = 1 + s (p = 1) or 1 + s + s²/2 (p = 2); weights are f(s_ij) / Σ_n f(s_in)
over valid keys. The score is
    s = q̂·k̂ / temperature   with normalize: each token centred over its features, then all
                            tokens of a (batch, head) divided by the largest valid norm, so
                            |q̂·k̂| ≤ 1 (the paper's normalisation);
    s = q·k / (temperature·√d)  without: softmax attention's scaled dot product.
Because f is a polynomial, the sums over keys factorise (the paper's F numerator and g
denominator) into linear attention with polynomial features; cast/attention/fastmax_kernel.py
computes it over chunks of the sequence in O(N·d^(p+1)) time per head and O(N·d) memory,
never an N x N tensor. Padded keys drop out of every sum.

Dropout acts on the key side of the numerator: each (head, key) is dropped with the given
probability and the survivors scaled up, which is standard attention dropout with one mask per
key column shared by all queries. The output stays unbiased and the denominator positive.
(The authors drop individual feature entries of the q and k factors instead.)

Shapes: B batch, h heads, N length, d head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, option_error, require_choice
from cast.attention.fastmax_kernel import polynomial_attention

ORDERS = (1, 2)
# Smallest largest-norm: keeps a degenerate head (all tokens equal) finite.
TINY = 1e-6


class FastmaxAttention(Attention):
    """Factorised polynomial attention.

    Args:
        p: order of the polynomial replacing exp (1 or 2).
        normalize: centre q and k per token and divide by the largest norm (|q̂·k̂| ≤ 1);
            False scores q·k/√d as softmax attention does.
        temperature: scores are divided by it before the polynomial (> 0).
        coefficients: the polynomial's p + 1 coefficients (a0, a1[, a2]); None: Taylor's 1/ℓ!.
    """

    name = "fastmax"

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, p: int = 2,
                 normalize: bool = False, temperature: float = 0.125,
                 coefficients: list[float] | None = None, **kw):
        super().__init__(d_model, n_heads, dropout, **kw)
        self.p = require_choice(self.name, "p", p, ORDERS)
        self.normalize = require_choice(self.name, "normalize", normalize, (True, False))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise option_error(self.name, "temperature", temperature, "a positive number")
        self.temperature = float(temperature)
        self.coefficients = taylor(p) if coefficients is None else tuple(float(a) for a in coefficients)
        if len(self.coefficients) != p + 1 or not all(math.isfinite(a) for a in self.coefficients) \
                or self.coefficients[0] <= 0:
            raise option_error(self.name, "coefficients", coefficients,
                               f"null or p + 1 = {p + 1} finite numbers (a0, a1, ...) with a0 > 0")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        real = mask[:, None, :, None].to(q.dtype)
        if self.normalize:
            q, k = normalise(q, mask), normalise(k, mask)
            scale = 1 / self.temperature
        else:
            scale = 1 / (self.temperature * math.sqrt(q.shape[-1]))
        keep = F.dropout(real.expand(*v.shape[:3], 1), self.dropout, self.training)
        u = torch.cat([v * keep, real.expand_as(keep)], -1)
        return polynomial_attention(q * (real * scale), k, u, self.coefficients)


def taylor(p: int) -> tuple[float, ...]:
    """exp's Taylor coefficients up to order p: 1, 1, 1/2, ..."""
    return tuple(1 / math.factorial(n) for n in range(p + 1))


def normalise(t: Tensor, mask: Tensor) -> Tensor:
    """Centre each token of t (B, h, N, d) over its features, then divide by the largest norm
    among the valid tokens of its (batch, head), so every valid token has norm at most 1."""
    t = t - t.mean(-1, keepdim=True)
    squared = (t * t).sum(-1).masked_fill(~mask[:, None, :], 0.0)
    largest = squared.amax(-1).clamp_min(TINY * TINY).sqrt()
    return t / largest[..., None, None]
