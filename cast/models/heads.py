"""Pooling and classification heads.

Shapes: B batch, N length, D model width, C classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("cls", "mean", "max")
PAIR_FEATURES = ("full", "concat")


def pool(x: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, N, D) -> (B, D): the first (CLS) token, or the mean or the largest value of each
    feature over real tokens."""
    if mode == "cls":
        return x[:, 0]
    if mode == "max":
        return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def mlp_head(d_in: int, d_hidden: int, num_classes: int) -> nn.Module:
    """LRA's classifier: Dense -> ReLU -> Dense."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, num_classes))


def pair_features(u: Tensor, v: Tensor, mode: str) -> Tensor:
    """Combine two pooled documents: [u, v, u*v, u-v] (``full``) or the LRA code's [u, v]."""
    if mode == "concat":
        return torch.cat([u, v], dim=-1)
    return torch.cat([u, v, u * v, u - v], dim=-1)
