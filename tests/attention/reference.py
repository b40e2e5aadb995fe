"""Slow, obviously-correct references that the mechanism tests compare against."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Exact attention over valid keys: q, k, v (B, h, N, d), mask (B, N) -> (B, h, N, d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_batch(b=2, n=24, d_model=32, valid=(24, 17), seed=0):
    """x (b, n, d_model) and a mask whose row i has ``valid[i]`` real tokens at the front."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d_model, generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(valid)[:, None]
    return x, mask


def heads_of(module, x: Tensor):
    """The module's own projected q, k, v (B, h, N, d), for comparing with a reference."""
    return module.project(x)


def full_from_heads(module, y: Tensor, mask: Tensor) -> Tensor:
    """Finish a reference (B, h, N, d) result with the module's own output projection."""
    return module.output(y, mask)
