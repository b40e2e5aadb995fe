"""Token embedding with positions and an optional CLS token.

Shapes: B batch, N length (N+1 with CLS), D model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

POSITIONS = ("sinusoidal", "learned", "none")


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """The Transformer's fixed sin/cos position table, (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class Embedding(nn.Module):
    """ids (B, N) and mask (B, N) -> x (B, N', D) and mask (B, N'), N' = N + cls.

    The CLS token gets id ``vocab_size`` (one past the task's vocabulary) and sits at position 0.
    """

    def __init__(self, vocab_size: int, d_model: int, max_length: int, positions: str = "sinusoidal", cls: bool = True):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"model.positions={positions!r} is not one of {POSITIONS}")
        self.cls = cls
        self.cls_id = vocab_size
        self.tokens = nn.Embedding(vocab_size + int(cls), d_model, padding_idx=0)
        length = max_length + int(cls)
        self.learned = nn.Embedding(length, d_model) if positions == "learned" else None
        table = sinusoidal_table(length, d_model) if positions == "sinusoidal" else torch.zeros(length, d_model)
        self.register_buffer("table", table, persistent=False)
        self.scale = math.sqrt(d_model)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.cls:
            ids = torch.cat([torch.full_like(ids[:, :1], self.cls_id), ids], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        n = ids.shape[1]
        if n > self.table.shape[0]:
            raise ValueError(
                f"sequence of {n} tokens exceeds the model's max_length {self.table.shape[0]}; "
                "raise task.max_length"
            )
        x = self.tokens(ids) * self.scale + self.table[:n]
        if self.learned is not None:
            x = x + self.learned.weight[:n]
        return x, mask
