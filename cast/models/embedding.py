"""Token embedding with positions and an optional CLS token.

Shapes: B batch, N length (N+1 with CLS), D model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cast.options import OptionError, option_error

POSITIONS = ("sinusoidal", "sinusoidal2d", "learned", "none")


def sinusoidal_table(length: int, dim: int, base: float = 10_000.0) -> Tensor:
    """The Transformer's fixed sin/cos position table, (length, dim): frequencies base^(-2i/dim),
    i.e. wavelengths from 2π to 2π·base; the Transformer's base is 10,000."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


def grid_table(length: int, dim: int, base: float = 10_000.0) -> Tensor:
    """Sin/cos positions of a square image read row by row, (length, dim), length = side².

    The first half of the channels encodes the row, the second half the column, each with
    :func:`sinusoidal_table`, so a dot product of two positions depends on their 2-D offset.
    """
    side = math.isqrt(length)
    if side * side != length or dim % 4:
        raise OptionError(f"model.positions=sinusoidal2d needs a square image (max_length={length}) "
                         f"and d_model divisible by 4 (d_model={dim})")
    axis = sinusoidal_table(side, dim // 2, base)
    rows = axis[:, None, :].expand(side, side, dim // 2)
    cols = axis[None, :, :].expand(side, side, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(length, dim)


class Embedding(nn.Module):
    """ids (B, N) and mask (B, N) -> x (B, N', D) and mask (B, N'), N' = N + cls.

    The CLS token gets id ``vocab_size`` (one past the task's vocabulary) and sits at position 0.
    A token's vector is its embedding (initialised N(0, 1)) times ``token_scale`` (default 1, as in
    LRA's code; None: √D, the Transformer paper's) plus its position: a fixed sin/cos table
    (``position_base``) times ``position_scale``, or a learned one. With the defaults a token vector
    (length about √D) and its fixed position (length √(D/2)) weigh about alike; ``token_scale=None``
    makes the token about √(2D) times as long, which drowns fixed positions (ListOps and Pathfinder
    stay at the majority class). ``position_scale`` 2-3 with ``position_base`` 100 serves relational
    tasks on small images (Pathfinder).
    """

    def __init__(self, vocab_size: int, d_model: int, max_length: int, positions: str = "sinusoidal", cls: bool = True,
                 token_scale: float | None = 1.0, position_scale: float = 1.0, position_base: float = 10_000.0):
        super().__init__()
        if positions not in POSITIONS:
            raise option_error("model", "transformer", "positions", positions, f"one of {POSITIONS}")
        if token_scale is not None and not token_scale > 0:
            raise option_error("model", "transformer", "token_scale", token_scale, "positive (null: sqrt(d_model))")
        if not position_scale >= 0:
            raise option_error("model", "transformer", "position_scale", position_scale, ">= 0")
        if not position_base > 1:
            raise option_error("model", "transformer", "position_base", position_base, "> 1 (the Transformer's: 10000)")
        self.cls = cls
        self.cls_id = vocab_size
        self.tokens = nn.Embedding(vocab_size + int(cls), d_model, padding_idx=0)
        length = max_length + int(cls)
        self.learned = nn.Embedding(length, d_model) if positions == "learned" else None
        if positions == "sinusoidal":
            table = sinusoidal_table(length, d_model, position_base)
        elif positions == "sinusoidal2d":   # the CLS token, if any, at position 0 gets zeros
            table = torch.cat([torch.zeros(int(cls), d_model), grid_table(max_length, d_model, position_base)])
        else:
            table = torch.zeros(length, d_model)
        self.register_buffer("table", table * position_scale, persistent=False)
        self.scale = math.sqrt(d_model) if token_scale is None else float(token_scale)

    def forward(self, ids: Tensor, mask: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``positions`` (B, N): each token's place in the full sequence (default 0..N-1), for
        batches whose padding was taken out (``task.compact``)."""
        if self.cls:
            ids = torch.cat([torch.full_like(ids[:, :1], self.cls_id), ids], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            if positions is not None:
                positions = torch.cat([torch.zeros_like(positions[:, :1]), positions + 1], dim=1)
        n = ids.shape[1]
        longest = n if positions is None else int(positions.max()) + 1
        if longest > self.table.shape[0]:
            raise ValueError(
                f"sequence of {longest} tokens exceeds the model's max_length {self.table.shape[0]}; "
                "raise task.max_length"
            )
        where = slice(n) if positions is None else positions   # a view of the tables, or a lookup
        x = self.tokens(ids) * self.scale + self.table[where]
        if self.learned is not None:
            x = x + self.learned.weight[where]
        return x, mask
