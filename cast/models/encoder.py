"""Pre-norm Transformer encoder whose attention mechanism is chosen by config.

Each block: x + attn(LN(x)), then x + MLP(LN(x)); a final LayerNorm closes the stack.
Shapes: B batch, N length, D model width.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d_model: int, attention: nn.Module, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = attention
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """``attention`` is a factory ``(d_model, n_heads, dropout, qkv_dim) -> module`` (a Hydra partial)."""

    def __init__(
        self,
        attention: Callable[..., nn.Module],
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        qkv_dim: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                attention(d_model=d_model, n_heads=n_heads, dropout=attention_dropout, qkv_dim=qkv_dim),
                mlp_dim,
                dropout,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
