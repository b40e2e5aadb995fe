"""Fastmax's factorised polynomial attention as linear attention over chunks, with a backward
pass that recomputes the features instead of saving them.

The score polynomial f(s) = a0 + a1·s (+ a2·s²) of s = q·k is an inner product of features,
f(q·k) = φ(q) · (c ⊙ φ(k)), with
    φ(x) = [1, x, (x_i x_j)_{i≤j}]        c = [a0, a1 (d times), a2·w_ij]
and w_ij = 2 off the diagonal (the symmetric half of x⊗x: d(d+1)/2 entries instead of d²).
So with the values augmented by a column of key weights, u_j = [v_j, m_j] (m_j = 0 drops key j
out of every sum),
    S = c ⊙ Σ_j φ(k_j) u_jᵀ        (F, d+1), F = 1 + d + d(d+1)/2 (1 + d for p = 1)
    [numerator_i, denominator_i] = φ(q_i)ᵀ S,   output_i = numerator_i / denominator_i.
The coefficients scale the rows of the small state S, never a feature tensor.
Keys and queries are visited in chunks of rows, so no (N, F) tensor exists at once: peak extra
memory is one chunk of features, and the backward pass rebuilds them chunk by chunk from the
saved q, k and u (O(N·d)). Time O(N·F·d) per head, never an N x N tensor.

Shapes: G any leading dims (batch, heads), N length, d head width.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Feature elements per chunk (all leading dims together): 4 MiB of float32, a few times the
# cache of one core, small against the (N, d) activations of a long sequence.
CHUNK_ELEMENTS = 1 << 20
# Smallest denominator: a degenerate head (p = 1 with every score at -1) stays finite.
TINY = 1e-6


def polynomial_attention(q: Tensor, k: Tensor, u: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """Σ_j f(q_i·k_j) v_j / Σ_j f(q_i·k_j) m_j with u = [v, m] (G, N, d+1) -> (G, N, d).

    Half-precision inputs are computed in float32 (squared scores lose too much in bf16);
    the result comes back in the input dtype."""
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        out = _Polynomial.apply(q.to(work), k.to(work), u.to(work), tuple(coefficients))
    return out.to(dtype)


class _Polynomial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, u, coefficients):
        weights = _weights(q, coefficients)
        chunk = _chunk(q, weights.numel())
        state = q.new_zeros(*q.shape[:-2], weights.numel(), u.shape[-1])
        for s in range(0, k.shape[-2], chunk):
            phi = features(k[..., s : s + chunk, :], len(coefficients))
            state.add_(phi.transpose(-1, -2) @ u[..., s : s + chunk, :])
        state.mul_(weights[:, None])
        out = q.new_empty(*q.shape[:-1], u.shape[-1] - 1)
        denominator = q.new_empty(q.shape[:-1])
        for s in range(0, q.shape[-2], chunk):
            both = features(q[..., s : s + chunk, :], len(coefficients)) @ state
            denominator[..., s : s + chunk] = both[..., -1].clamp_min(TINY)
            out[..., s : s + chunk, :] = both[..., :-1] / denominator[..., s : s + chunk, None]
        ctx.save_for_backward(q, k, u, state, out, denominator, weights)
        ctx.terms = len(coefficients)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, u, state, out, denominator, weights = ctx.saved_tensors
        terms = ctx.terms
        chunk = _chunk(q, weights.numel())
        # Through output = numerator / denominator: d numerator = g / den, d den = -(g·out) / den,
        # and zero where the denominator was clamped (there it did not depend on the inputs).
        grad_state = torch.zeros_like(state)
        grad_q = torch.empty_like(q)
        for s in range(0, q.shape[-2], chunk):
            rows = slice(s, s + chunk)
            den = denominator[..., rows, None]
            g = grad[..., rows, :] / den
            g_den = -(g * out[..., rows, :]).sum(-1, keepdim=True) * (den > TINY)
            g_both = torch.cat([g, g_den], -1)
            grad_state.add_(features(q[..., rows, :], terms).transpose(-1, -2) @ g_both)
            grad_q[..., rows, :] = features_backward(q[..., rows, :], g_both @ state.transpose(-1, -2))
        grad_state.mul_(weights[:, None])
        grad_k, grad_u = torch.empty_like(k), torch.empty_like(u)
        for s in range(0, k.shape[-2], chunk):
            rows = slice(s, s + chunk)
            grad_u[..., rows, :] = features(k[..., rows, :], terms) @ grad_state
            grad_k[..., rows, :] = features_backward(k[..., rows, :], u[..., rows, :] @ grad_state.transpose(-1, -2))
        return grad_q, grad_k, grad_u, None


def features(x: Tensor, terms: int) -> Tensor:
    """φ(x) = [1, x, (x_i x_j)_{i≤j}] (the last part for terms = 3) of x (..., C, d) -> (..., C, F).
    Written row slice by row slice of the upper triangle into one buffer: an index gather is
    several times slower on CPU, and a concatenation copies every element once more."""
    d = x.shape[-1]
    phi = x.new_empty(*x.shape[:-1], _width(d, terms))
    phi[..., 0] = 1
    phi[..., 1 : 1 + d] = x
    start = 1 + d
    for i in range(d if terms == 3 else 0):
        torch.mul(x[..., i:], x[..., i, None], out=phi[..., start : start + d - i])
        start += d - i
    return phi


def features_backward(x: Tensor, grad_phi: Tensor) -> Tensor:
    """Gradient with respect to x (..., C, d) of Σ grad_phi · features(x)."""
    d = x.shape[-1]
    grad = grad_phi[..., 1 : 1 + d].clone()
    start = 1 + d
    for i in range(d if grad_phi.shape[-1] > start else 0):
        g = grad_phi[..., start : start + d - i]
        grad[..., i] += (g * x[..., i:]).sum(-1)
        grad[..., i:] += g * x[..., i, None]
        start += d - i
    return grad


def _weights(x: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """Per feature: a0, a1 (d times), then a2·w_ij with w = 2 off the diagonal, 1 on it, so
    that φ(q) · (weights ⊙ φ(k)) = f(q·k)."""
    d = x.shape[-1]
    parts = [x.new_full((1,), coefficients[0]), x.new_full((d,), coefficients[1])]
    for i in range(d if len(coefficients) == 3 else 0):
        row = x.new_full((d - i,), 2 * coefficients[2])
        row[0] = coefficients[2]  # the diagonal x_i x_i appears once in q⊗q·k⊗k, the rest twice
        parts.append(row)
    return torch.cat(parts)


def _width(d: int, terms: int) -> int:
    """F: feature count of a polynomial with ``terms`` coefficients in head width d."""
    return 1 + d + (d * (d + 1) // 2 if terms == 3 else 0)


def _chunk(q: Tensor, width: int) -> int:
    """Rows per chunk so that one chunk of features holds about CHUNK_ELEMENTS elements."""
    lead = q[..., 0, 0].numel()
    return max(16, CHUNK_ELEMENTS // max(1, lead * width))
