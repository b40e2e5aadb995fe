"""Reformer LSH attention: Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer",
ICLR 2020.

Queries and keys are shared: keys are the L2-normalised queries (no key projection), scores are
q·k/√d. Each of ``n_hashes`` rounds hashes the keys with angular LSH, h(x) = argmax([xR; −xR])
for a random rotation R of width n_buckets/2, sorts the positions by (bucket, position) with a
stable sort, and cuts the sorted sequence into chunks of ``bucket_size``. Each chunk's queries
attend to the keys of their own chunk and of the chunk before (the first chunk looks back at the
last; a single chunk only at itself). A query never attends to itself while anything else is in
view: its own score is set to a large negative value (not -inf), so it is used only when nothing
else is available. Each round yields outputs and their log-sum-exp; rounds are combined with
weights softmax over rounds of the log-sum-exp, which is attention over the union of the keys the
rounds saw (a key seen by two rounds counts twice). The paper's P_i is the set of keys a query
sees, its h is ``buckets``.

Padding: padded keys get the most negative score, so they are never attended, and padded
positions are hashed to an extra bucket after all others, so they sort behind every real token and
cannot change which real tokens share a chunk. A length that is not a multiple of ``bucket_size``
is padded internally the same way.

Number of buckets: one per chunk, n_buckets = (padded length) / bucket_size, so the average bucket
fills one chunk; the ±R trick needs an even count, so an odd count above 1 is rounded up; a
sequence that fits in one chunk has one bucket (no hashing needed).

Random rotations are drawn afresh at every training call; in eval they come from a generator
seeded with ``hash_seed``, so evaluation is deterministic. Hashing, sorting and the softmax run in
float32, also under bf16 autocast.

Cost per head and round: O(N·bucket_size·d) time and O(N·bucket_size) memory for the attention,
O(N·n_buckets·d) = O(N²·d/bucket_size) time and O(N·n_buckets) memory for hashing (no larger than
the attention's while N ≤ 2·bucket_size², 8K tokens at the default) and O(N log N) for the sort;
never an N x N tensor.

Shapes: B batch, h heads, N length (padded to a multiple of c), d head width, r hashing rounds,
C chunks, c chunk size (``bucket_size``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, require_positive

# Score of a query with itself: far below any real score, far above padding's.
SELF_SCORE = -5e4


class ReformerAttention(Attention):
    """LSH attention with shared queries and keys.

    Args:
        bucket_size: chunk size c; also sets the number of buckets (length / c).
        n_hashes: hashing rounds r.
        hash_seed: seed of the fixed rotations used in eval.
    """

    name = "reformer"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bucket_size: int = 64,
        n_hashes: int = 2,
        hash_seed: int = 0,
        **kw,
    ):
        super().__init__(d_model, n_heads, dropout, shared_qk=True, **kw)
        require_positive(self.name, bucket_size=bucket_size, n_hashes=n_hashes)
        self.bucket_size, self.n_hashes, self.hash_seed = bucket_size, n_hashes, hash_seed

    def bucket_count(self, length: int) -> int:
        """Number of buckets for a sequence padded to ``length`` (a multiple of bucket_size)."""
        chunks = length // self.bucket_size
        return 1 if chunks == 1 else chunks + chunks % 2

    def attend(self, q: Tensor, k: None, v: Tensor, mask: Tensor) -> Tensor:
        """``k`` is None (no key projection): the keys are the normalised queries."""
        n = q.shape[2]
        extra = -n % self.bucket_size
        q, v, mask = F.pad(q, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra)), F.pad(mask, (0, extra))
        order = self.buckets(F.normalize(q, dim=-1), mask).sort(dim=-1, stable=True).indices
        out, lse = self.chunked(q, v, mask, order)
        weights = torch.softmax(lse, dim=2).unsqueeze(-1)
        return (out * weights).sum(2)[:, :, :n].to(v.dtype)

    @torch.no_grad()
    def buckets(self, keys: Tensor, mask: Tensor) -> Tensor:
        """Bucket (B, h, r, N) of every position in every round; padding gets the extra bucket."""
        b, h, n, d = keys.shape
        n_buckets = self.bucket_count(n)
        if n_buckets == 1:
            found = keys.new_zeros(b, h, self.n_hashes, n, dtype=torch.long)
        else:
            shape = (d, self.n_hashes, n_buckets // 2)
            if self.training:
                rotations = torch.randn(shape, device=keys.device)
            else:
                generator = torch.Generator().manual_seed(self.hash_seed)
                rotations = torch.randn(shape, generator=generator).to(keys.device)
            with torch.autocast(keys.device.type, enabled=False):
                rotated = torch.einsum("bhnd,drk->bhrnk", keys.float(), rotations)
            found = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
        return found.masked_fill(~mask[:, None, None, :], n_buckets)

    def chunked(self, q: Tensor, v: Tensor, mask: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        """Attention within chunks of the sorted order (B, h, r, N): outputs (B, h, r, N, d) and
        log-sum-exp (B, h, r, N) of every round, back in the original positions.

        A query's own key sits on the diagonal of its chunk's first c keys (each round's order
        is a permutation and a chunk's look-back is another chunk), so the self score is set
        there; padded keys get their most negative score from an extra key column against a
        query column of ones. The keys are normalised after the sort (the same values)."""
        c, d = self.bucket_size, q.shape[-1]
        b, h, r, n = order.shape
        # Flat row indices of each round's order and of its inverse, for reordering rows.
        undo = order.argsort(-1)
        offsets = torch.arange(b * h * r, device=order.device).view(b, h, r, 1) * n
        rows, undo_rows = (order + offsets).flatten(), (undo + offsets).flatten()
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            sorted_q, sorted_v = (permute(t.to(dtype).unsqueeze(2).expand(b, h, r, n, d), rows, undo_rows)
                                  for t in (q, v))
            real = mask[:, None, None, :].expand_as(order).gather(-1, order)
            bias = torch.zeros(real.shape, dtype=dtype, device=q.device).masked_fill_(~real, torch.finfo(dtype).min)
            sorted_k = look_one_back(chunks(torch.cat([F.normalize(sorted_q, dim=-1), bias.unsqueeze(-1)], -1), c))
            sorted_q = torch.cat([sorted_q / math.sqrt(d), torch.ones_like(bias).unsqueeze(-1)], -1)
            drop = self.dropout if self.training else 0.0
            out, lse = _ChunkAttention.apply(chunks(sorted_q, c), sorted_k, look_one_back(chunks(sorted_v, c)), drop)
            out = permute(torch.cat([out.flatten(3, 4), lse.flatten(3, 4)], -1), undo_rows, rows)
        return out[..., :d], out[..., d]


class _ChunkAttention(torch.autograd.Function):
    """softmax(q kᵀ) v per chunk, and the log-sum-exp, with a hand-written backward pass that
    keeps one (c x 2c) tensor per chunk, the weights, where autograd keeps several (scores,
    their masked copies, exponentials). q (…, c, d + 1) and k (…, k, d + 1) carry the padding
    column (its gradient is not wanted); the self score is set on the diagonal of the first c
    keys. Dropout acts on the weights that multiply v."""

    @staticmethod
    def forward(ctx, q, k, v, dropout):
        scores = q @ k.transpose(-1, -2)
        scores[..., : scores.shape[-2]].diagonal(dim1=-2, dim2=-1).clamp_(max=SELF_SCORE)  # padding's stays below
        lse = scores.logsumexp(-1, keepdim=True)
        weights = scores.sub_(lse).exp_()
        kept = F.dropout(torch.ones_like(weights), dropout) if dropout else None
        out = (weights if kept is None else weights * kept) @ v
        ctx.save_for_backward(q, k, v, weights, kept, out)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, weights, kept, out = ctx.saved_tensors
        grad_weights = grad_out @ v.transpose(-1, -2)
        if kept is not None:
            grad_weights.mul_(kept)
        shift = (grad_out * out).sum(-1, keepdim=True) - grad_lse
        # Zero wherever the weight is (padding, the self score next to any other key).
        grad_scores = grad_weights.sub_(shift).mul_(weights)
        dropped = weights if kept is None else weights * kept
        grad_q = F.pad(grad_scores @ k[..., :-1], (0, 1))
        grad_k = F.pad(grad_scores.transpose(-1, -2) @ q[..., :-1], (0, 1))
        return grad_q, grad_k, dropped.transpose(-1, -2) @ grad_out, None


class _Permute(torch.autograd.Function):
    """t (..., X) with its rows reordered by the flat permutation ``rows``; the gradient is
    reordered back by its inverse, one index_select each way (gather would copy an index per
    element and scatter-add its gradient into zeros)."""

    @staticmethod
    def forward(ctx, t, rows, inverse):
        ctx.save_for_backward(inverse)
        return t.reshape(-1, t.shape[-1]).index_select(0, rows).view(t.shape)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.reshape(-1, grad.shape[-1]).index_select(0, inverse).view(grad.shape), None, None


def permute(t: Tensor, rows: Tensor, inverse: Tensor) -> Tensor:
    return _Permute.apply(t, rows, inverse)


def chunks(t: Tensor, size: int) -> Tensor:
    """Split dim 3 (the sorted length) into (C, size): (B, h, r, N, ...) -> (B, h, r, C, size, ...)."""
    return t.unflatten(3, (t.shape[3] // size, size))


def look_one_back(t: Tensor) -> Tensor:
    """Each chunk followed by the previous one (cyclically): (B, h, r, C, c, ...) ->
    (B, h, r, C, 2c, ...); a single chunk is left alone so no key is seen twice."""
    if t.shape[3] == 1:
        return t
    return torch.cat([t, t.roll(1, dims=3)], dim=4)
