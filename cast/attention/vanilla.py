"""Exact multi-head softmax attention, the reference for every other mechanism.

``impl="fused"`` calls torch's scaled_dot_product_attention with a boolean key-padding mask, so
flash / memory-efficient kernels serve it where the device has them (its memory is then linear
in length). ``impl="math"`` materialises the N x N score matrix as LRA-era Transformers did; the
benchmark uses it as the baseline of the paper's speed and memory ratios.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, key_padding_bias, require_choice

IMPLS = ("fused", "math")


class VanillaAttention(Attention):
    name = "vanilla"

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, impl: str = "fused", **kw):
        super().__init__(d_model, n_heads, dropout, **kw)
        self.impl = require_choice(self.name, "impl", impl, IMPLS)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.impl == "fused":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + key_padding_bias(mask, q.dtype)
        weights = F.dropout(torch.softmax(scores, dim=-1), p, self.training)
        return weights @ v
