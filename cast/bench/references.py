"""The reference implementations --peers measures ours against (cast/bench/peers.py), and how each
pair is matched: each builder takes our layer and returns the reference's with our weights copied
in, behind our calling convention ``forward(x, mask) -> y``. The packages are optional (the
``peers`` extra; pytorch-fast-transformers builds from source, see the README)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Peer:
    """One pair. ``build`` ("module:function") takes our layer and returns the reference layer as
    an ``nn.Module`` with ``forward(x, mask)``, our weights copied into it. ``exact`` is what both
    are compared with: "softmax" or "shared-qk" (keys = normalised queries, no self). ``seeded``:
    agreement runs both in training mode from the same RNG state (so they draw the same random
    numbers); otherwise in eval mode."""

    mechanism: str
    package: str
    module: str
    reference: str
    build: str
    matched: str
    exact: str = "softmax"
    seeded: bool = False

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Reference(nn.Module):
    """A reference layer behind our calling convention, ``forward(x, mask) -> y``."""

    def __init__(self, layer: nn.Module, call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.call(self.layer, x, mask)


@torch.no_grad()
def copy_linears(layer: nn.Module, ours: nn.Module, names: dict[str, str]) -> None:
    """Copy our projections into the reference's: {its name: ours}, biases where it has them."""
    for target, source in ((getattr(layer, t), getattr(ours, s)) for t, s in names.items()):
        target.weight.copy_(source.weight)
        if target.bias is not None:
            target.bias.copy_(source.bias)


def performer_reference(ours: nn.Module) -> nn.Module:
    from performer_pytorch import SelfAttention

    d = ours.d_head
    layer = SelfAttention(dim=ours.d_model, heads=ours.n_heads, dim_head=d, nb_features=ours.num_features,
                          qkv_bias=True, dropout=0.0)
    copy_linears(layer, ours, dict(to_q="q_proj", to_k="k_proj", to_v="v_proj", to_out="out_proj"))
    with torch.no_grad():
        layer.fast_attention.projection_matrix.copy_(ours.features)
    return Reference(layer, lambda m, x, mask: m(x, mask=mask))


def reformer_reference(ours: nn.Module) -> nn.Module:
    from reformer_pytorch import LSHSelfAttention

    layer = LSHSelfAttention(dim=ours.d_model, heads=ours.n_heads, dim_head=ours.d_head, bucket_size=ours.bucket_size,
                             n_hashes=ours.n_hashes, dropout=0.0)
    with torch.no_grad():  # the reference's projections have no bias: ours lose theirs
        ours.q_proj.bias.zero_()
        ours.v_proj.bias.zero_()
    copy_linears(layer, ours, dict(toqk="q_proj", tov="v_proj", to_out="out_proj"))
    return Reference(layer, lambda m, x, mask: m(x, input_mask=mask))


def fast_transformers_reference(ours: nn.Module) -> nn.Module:
    from fast_transformers.attention import AttentionLayer, ClusteredAttention, ImprovedClusteredAttention
    from fast_transformers.masking import FullMask, LengthMask

    options = dict(clusters=ours.num_clusters, iterations=ours.iterations, bits=ours.planes.shape[1],
                   hash_bias=True, attention_dropout=0.0)
    inner = (ImprovedClusteredAttention(topk=ours.topk, **options) if hasattr(ours, "topk")
             else ClusteredAttention(**options))
    layer = AttentionLayer(inner, ours.d_model, ours.n_heads)
    copy_linears(layer, ours, dict(query_projection="q_proj", key_projection="k_proj",
                                   value_projection="v_proj", out_projection="out_proj"))

    def call(m, x, mask):
        n = x.shape[1]
        lengths = LengthMask(mask.sum(1), max_len=n, device=x.device)
        return m(x, x, x, FullMask(n, device=x.device), lengths, lengths) * mask.unsqueeze(-1).to(x.dtype)

    return Reference(layer, call)


FAST_TRANSFORMERS = ("same q/k/v/out weights; same clusters, bits (with hash bias), iterations{}; "
                     "hash planes differ (each draws its own), so outputs agree in distribution")
PEERS = [
    Peer("performer", "performer-pytorch", "performer_pytorch", "performer_pytorch.SelfAttention",
         "cast.bench.references:performer_reference",
         "same q/k/v/out weights (qkv_bias=True); our features copied into its projection_matrix; "
         "num_features -> nb_features; its stabiliser eps 1e-4 (ours 1e-6) and key shift differ"),
    Peer("reformer", "reformer-pytorch", "reformer_pytorch", "reformer_pytorch.LSHSelfAttention",
         "cast.bench.references:reformer_reference",
         "its toqk/tov/to_out = our q/v/out weights (q/v biases zeroed: it has none); bucket_size, "
         "n_hashes; same rotations (same RNG draws); it looks back across rounds at each round's first chunk",
         exact="shared-qk", seeded=True),
    Peer("clustered", "pytorch-fast-transformers", "fast_transformers",
         "fast_transformers ClusteredAttention", "cast.bench.references:fast_transformers_reference",
         FAST_TRANSFORMERS.format("")),
    Peer("iclustered", "pytorch-fast-transformers", "fast_transformers",
         "fast_transformers ImprovedClusteredAttention", "cast.bench.references:fast_transformers_reference",
         FAST_TRANSFORMERS.format(", topk")),
]
