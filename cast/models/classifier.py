"""The LRA model: embedding -> encoder -> pooling -> head, for single and pair (Retrieval) tasks.

It is a plain nn.Module that knows nothing of Lightning or of tasks; the run joins it to a
datamodule by passing ``vocab_size``, ``num_classes``, ``max_length`` and ``pair``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cast.models.embedding import Embedding
from cast.models.encoder import Encoder
from cast.models.heads import PAIR_FEATURES, POOLINGS, mlp_head, pair_features, pool
from cast.options import option_error


class LRAClassifier(nn.Module):
    def __init__(
        self,
        attention: Callable[..., nn.Module],
        vocab_size: int,
        num_classes: int,
        max_length: int,
        pair: bool = False,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_dim: int = 256,
        qkv_dim: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        positions: str = "sinusoidal",
        token_scale: float | None = 1.0,
        position_scale: float = 1.0,
        position_base: float = 10_000.0,
        pooling: str = "cls",
        pair_features: str = "full",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise option_error("model", "transformer", "pooling", pooling, f"one of {POOLINGS}")
        if pair_features not in PAIR_FEATURES:
            raise option_error("model", "transformer", "pair_features", pair_features, f"one of {PAIR_FEATURES}")
        self.pooling, self.pair, self.pair_mode = pooling, pair, pair_features
        self.embedding = Embedding(vocab_size, d_model, max_length, positions, cls=pooling == "cls",
                                   token_scale=token_scale, position_scale=position_scale, position_base=position_base)
        self.dropout = nn.Dropout(dropout)
        self.encoder = Encoder(attention, d_model, n_layers, n_heads, mlp_dim, dropout, attention_dropout, qkv_dim)
        d_in = d_model * (1 if not pair else 2 if pair_features == "concat" else 4)
        self.head = mlp_head(d_in, mlp_dim, num_classes)

    def encode(self, ids: Tensor, mask: Tensor, positions: Tensor | None = None) -> Tensor:
        """ids, mask (B, N) and, for compacted batches, positions (B, N) -> pooled (B, D)."""
        x, mask = self.embedding(ids, mask, positions)
        return pool(self.encoder(self.dropout(x), mask), mask, self.pooling)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """A task batch -> logits (B, C). Pair tasks encode both documents with one encoder."""
        if not self.pair:
            return self.head(self.encode(batch["input_ids"], batch["mask"], batch.get("positions")))
        ids = torch.cat([batch["input_ids"], batch["input_ids_2"]])
        mask = torch.cat([batch["mask"], batch["mask_2"]])
        u, v = self.encode(ids, mask).chunk(2)
        return self.head(pair_features(u, v, self.pair_mode))

    def attention_modules(self) -> list[nn.Module]:
        return [block.attention for block in self.encoder.blocks]
