"""CAST's attention inside the clusters: softmax attention of each cluster's queries over its valid
members, for all (batch, head, cluster) blocks at once.

Shapes: blocks (P, C) = (B·h, Nc), G = P·C of them, L queries per block (κ members, or κ + 1 with
the surrogate's summary row), κ keys, d head width; ``valid`` (P, C, κ) is True on real members.
A block without a real member attends over its padding slots (:func:`attendable`): finite
outputs that the combination never reads.

On a CPU in float32 (or float64), blocks of at most ``SMALL_BLOCK`` members run through
:class:`_BlockAttention`, a few dozen blocks at a time so that each chunk's (L, κ) scores stay in
a core's cache, with the backward pass recomputing them (as a fused kernel would): torch's CPU
flash kernel serves such small blocks more slowly, and with dropout SDPA materialises every
block's probabilities. Larger blocks, other devices and other dtypes go to torch's
``scaled_dot_product_attention`` in 4-D (B·h, Nc, ·, d) form, which its fused kernels take.
Measured on the layer step (2 CPU cores, B = 4, h = 4, d = 32): with κ = 64 the chunked path is
5% faster; κ = 128 is a tie; at κ = 256 and 512 the flash kernel is 7% and 15% faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import key_padding_bias

# Scores per chunk of blocks (L·κ each): 1 MiB of float32, so a chunk's scores, probabilities and
# their gradients stay in cache.
BLOCK_CHUNK_ELEMENTS = 2**18
# Members per block up to which the chunked CPU path runs (see the module docstring).
SMALL_BLOCK = 64


def block_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, dropout: float) -> Tensor:
    """softmax(q kᵀ / √d + mask) v per block, with attention dropout ``dropout`` (0 to disable):
    q (P, C, L, d), k and v (P, C, κ, d), valid (P, C, κ) -> (P, C, L, d), for P·C = G blocks
    (CAST passes P = B·h and C = Nc)."""
    on_cpu = q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
    if on_cpu and q.dtype in (torch.float32, torch.float64) and k.shape[-2] <= SMALL_BLOCK:
        seed = int(torch.randint(2**62, (1,))) if dropout > 0 else 0  # from the global RNG
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]
        out = _BlockAttention.apply(*flat, valid.reshape(-1, valid.shape[-1]), dropout, seed)
        return out.view(q.shape)
    keys = attendable(valid).unsqueeze(-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout)


def attendable(valid: Tensor) -> Tensor:
    """The keys each block attends over: its valid ones, or all of them in a block without any
    (softmax over no key is NaN; over padding it is finite, and never read)."""
    return valid | ~valid.any(dim=-1, keepdim=True)


def _chunks(g: int, per_block: int) -> list[slice]:
    step = max(1, BLOCK_CHUNK_ELEMENTS // per_block)
    return [slice(i, min(i + step, g)) for i in range(0, g, step)]


def _probabilities(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(scale · q kᵀ + bias) for one chunk: (m, L, d), (m, κ, d), (m, 1, κ) -> (m, L, κ)."""
    return torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale), dim=-1)


class _BlockAttention(torch.autograd.Function):
    """Chunked block attention. Dropout masks come from a generator seeded per call, so the
    backward pass draws the same masks again instead of storing them."""

    @staticmethod
    def forward(ctx, q, k, v, valid, p, seed):
        scale = q.shape[-1] ** -0.5
        bias = _key_bias(valid, q.dtype)
        gen = torch.Generator(device=q.device).manual_seed(seed) if p > 0 else None
        out = q.new_empty(q.shape)
        for rows in _chunks(q.shape[0], q.shape[1] * k.shape[1]):
            probs = _probabilities(q[rows], k[rows], bias[rows], scale)
            if gen is not None:
                probs = probs * _keep(probs, p, gen)
            torch.bmm(probs, v[rows], out=out[rows])
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out = ctx.saved_tensors
        p, scale = ctx.p, q.shape[-1] ** -0.5
        gen = torch.Generator(device=q.device).manual_seed(ctx.seed) if p > 0 else None
        grad_out = grad_out.contiguous()
        # Σ_j P_ij dP_ij = grad_out_i · out_i, with or without dropout.
        delta = torch.linalg.vecdot(grad_out, out).unsqueeze(-1)
        grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (q, k, v))
        for rows in _chunks(q.shape[0], q.shape[1] * k.shape[1]):
            probs = _probabilities(q[rows], k[rows], bias[rows], scale)
            g = grad_out[rows]
            grad_probs = torch.bmm(g, v[rows].transpose(1, 2))
            if gen is not None:
                keep = _keep(probs, p, gen)
                torch.bmm((probs * keep).transpose(1, 2), g, out=grad_v[rows])
                grad_probs.mul_(keep)
            else:
                torch.bmm(probs.transpose(1, 2), g, out=grad_v[rows])
            grad_scores = grad_probs.sub_(delta[rows]).mul_(probs).mul_(scale)
            torch.bmm(grad_scores, k[rows], out=grad_q[rows])
            torch.bmm(grad_scores.transpose(1, 2), q[rows], out=grad_k[rows])
        return grad_q, grad_k, grad_v, None, None, None


def _key_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(G, 1, κ): 0 on the :func:`attendable` keys, the dtype's lowest value elsewhere."""
    return key_padding_bias(attendable(valid), dtype)[:, 0]


def _keep(probs: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Inverted dropout mask for one chunk: 0 with probability p, else 1 / (1 − p)."""
    draw = torch.rand(probs.shape, generator=gen, device=probs.device, dtype=probs.dtype)
    return (draw >= p).to(probs.dtype).div_(1 - p)
