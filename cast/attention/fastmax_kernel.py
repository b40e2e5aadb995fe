"""Fastmax's factorised polynomial attention as linear attention over chunks, with a backward
pass that recomputes per chunk instead of saving feature tensors.

With the values augmented by a column of key weights, u_j = [v_j, m_j] (m_j = 0 drops key j out
of every sum), and f(s) = a0 + a1·s (+ a2·s²) of s = q·k, the sums over keys are three states
    S0 = a0 Σ_j u_j                    (e)         e = d_v + 1
    S1 = a1 Σ_j k_j u_jᵀ               (d, e)
    S2 = a2 Σ_j k_j ⊗ k_j ⊗ u_j        (d, d, e)   (p = 2), symmetric in its first two axes
and [numerator_i, denominator_i] = S0 + q_iᵀ S1 + (q_i ⊗ q_i)·S2, output = numerator / denominator.
Every product is a matrix product over a chunk of rows: S2 = kᵀ (k ⊗ u), and (q_i ⊗ q_i)·S2 is
the chunk's rows of q ⊗ q (C, d²) times S2 read as (d², e), so the feature map
φ(x) = [1, x, x ⊗ x] exists for one chunk at a time only (its symmetric half would need
per-element gathers, several times slower on CPU than these products). The backward pass is
the same kind of products: dq = Ĝ S1ᵀ + 2 (q ⊗ Ĝ) S2ᵀ and dS2 = qᵀ (q ⊗ Ĝ), then
dk = u dS1ᵀ + 2 (k ⊗ u) dS2ᵀ and du = S0-, S1- and S2-terms, with Ĝ the gradient through the
division. Rows are visited in chunks, so no (N, d·e) tensor exists at once, and only q, k, u,
the states, the output and the denominator are saved (O(N·d)).
Time O(N·d^p·e) per head, never an N x N tensor.

Shapes: G any leading dims (batch, heads), N length, d head width, e = d_v + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one chunk's (rows, d·e) products (all leading dims together): 8 MiB of float32,
# small against the (N, d) activations of a long sequence, large enough for efficient products.
CHUNK_ELEMENTS = 1 << 21
# Smallest denominator: a degenerate head (p = 1 with every score at -1) stays finite.
TINY = 1e-6


def polynomial_attention(q: Tensor, k: Tensor, u: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """Σ_j f(q_i·k_j) v_j / Σ_j f(q_i·k_j) m_j with u = [v, m] (G, N, d+1) -> (G, N, d).

    Half-precision inputs are computed in float32 (squared scores lose too much in bf16);
    the result comes back in the input dtype. The inputs are made contiguous first: heads split
    from a projection are a strided view, and the row-wise outer products of its chunks would
    come out strided too and be copied before every product (a quarter of a step at 4K)."""
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        out = _Polynomial.apply(*(t.to(work).contiguous() for t in (q, k, u)), tuple(coefficients))
    return out.to(dtype)


class _Polynomial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, u, coefficients):
        quadratic = len(coefficients) == 3
        chunk = _chunk(q, u)
        s0 = u.sum(-2) * coefficients[0]
        s1 = (k.transpose(-1, -2) @ u).mul_(coefficients[1])
        s2 = _outer_sum(k, k, u, chunk).mul_(coefficients[2]) if quadratic else None
        out = q.new_empty(*q.shape[:-1], u.shape[-1] - 1)
        denominator = q.new_empty(q.shape[:-1])
        for rows in _chunks(q, chunk):
            both = _read(q[..., rows, :], s0, s1, s2)
            denominator[..., rows] = both[..., -1].clamp_min(TINY)
            out[..., rows, :] = both[..., :-1] / denominator[..., rows, None]
        ctx.save_for_backward(q, k, u, s1, s2, out, denominator)
        ctx.coefficients = coefficients
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, u, s1, s2, out, denominator = ctx.saved_tensors
        a = ctx.coefficients
        chunk = _chunk(q, u)
        # Through output = numerator / denominator: d numerator = g / den, d den = -(g·out) / den,
        # and zero where the denominator was clamped (there it did not depend on the inputs).
        grad_q = torch.empty_like(q)
        g_all = q.new_empty(*q.shape[:-1], u.shape[-1])
        d_s2 = torch.zeros_like(s2) if s2 is not None else None
        twice_s2 = 2 * s2 if s2 is not None else None  # once, not in every chunk
        for rows in _chunks(q, chunk):
            den = denominator[..., rows, None]
            g = grad[..., rows, :] / den
            g_den = -(g * out[..., rows, :]).sum(-1, keepdim=True) * (den > TINY)
            g_all[..., rows, :] = g_both = torch.cat([g, g_den], -1)
            grad_q[..., rows, :] = g_both @ s1.transpose(-1, -2)
            if s2 is not None:
                qg = _outer(q[..., rows, :], g_both)
                grad_q[..., rows, :] += qg @ twice_s2.transpose(-1, -2)
                d_s2.add_(q[..., rows, :].transpose(-1, -2) @ qg)
        d_s0 = g_all.sum(-2, keepdim=True) * a[0]
        d_s1 = (q.transpose(-1, -2) @ g_all).mul_(a[1])
        if d_s2 is not None:
            d_s2.mul_(a[2])
        twice_d_s2 = 2 * d_s2 if d_s2 is not None else None
        grad_k, grad_u = torch.empty_like(k), torch.empty_like(u)
        for rows in _chunks(k, chunk):
            kc, uc = k[..., rows, :], u[..., rows, :]
            grad_u[..., rows, :] = d_s0 + kc @ d_s1
            grad_k[..., rows, :] = uc @ d_s1.transpose(-1, -2)
            if d_s2 is not None:
                grad_u[..., rows, :] += _quadratic(kc, d_s2)
                grad_k[..., rows, :] += _outer(kc, uc) @ twice_d_s2.transpose(-1, -2)
        return grad_q, grad_k, grad_u, None


def _outer(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise x ⊗ y: (..., C, d) and (..., C, e) -> (..., C, d·e)."""
    return (x[..., :, None] * y[..., None, :]).flatten(-2)


def _outer_sum(x: Tensor, y: Tensor, z: Tensor, chunk: int) -> Tensor:
    """Σ_rows x ⊗ (y ⊗ z) as (..., d, d·e), a chunk of rows at a time."""
    total = x.new_zeros(*x.shape[:-2], x.shape[-1], y.shape[-1] * z.shape[-1])
    for rows in _chunks(x, chunk):
        total.add_(x[..., rows, :].transpose(-1, -2) @ _outer(y[..., rows, :], z[..., rows, :]))
    return total


def _quadratic(x: Tensor, s: Tensor) -> Tensor:
    """Σ_ab x_a x_b s[a, b·e + ·] of each row: x (..., C, d), s (..., d, d·e) -> (..., C, e).

    One product of the rows' x ⊗ x (C, d²) with s read as (d², e), of inner dimension d²;
    x @ s first and then a sum over b would write and read a (C, d·e) tensor twice more."""
    d = x.shape[-1]
    return _outer(x, x) @ s.reshape(*s.shape[:-2], d * d, -1)


def _read(q: Tensor, s0: Tensor, s1: Tensor, s2: Tensor | None) -> Tensor:
    """[numerator, denominator] of a chunk of queries: S0 + q S1 (+ (q ⊗ q)·S2)."""
    both = s0[..., None, :] + q @ s1
    return both if s2 is None else both + _quadratic(q, s2)


def _chunks(x: Tensor, chunk: int):
    """Row slices of x (..., N, d) of ``chunk`` rows."""
    return (slice(s, s + chunk) for s in range(0, x.shape[-2], chunk))


def _chunk(q: Tensor, u: Tensor) -> int:
    """Rows per chunk so that one chunk's (rows, d·e) product holds about CHUNK_ELEMENTS elements."""
    lead = q[..., 0, 0].numel()
    return max(16, CHUNK_ELEMENTS // max(1, lead * q.shape[-1] * u.shape[-1]))
