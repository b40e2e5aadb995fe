"""Query hashing and K-means in Hamming space, shared by the two clustered mechanisms.

Vyas et al. (2020) cluster queries cheaply by hashing each into ``bits`` bits with random
hyperplanes and running Lloyd's K-means on the codes under Hamming distance. For ±1 codes x and c
of b bits the Hamming distance is (b - <x, c>) / 2, so the nearest centroid is the one of largest
similarity <x, c>. Everything here is index bookkeeping without gradient.

The reference implementation does this with popcounts in C++. PyTorch has no popcount, and
emulating one with shifts and masks on (N, C) int64 tensors is slower than the plain ±1 float
matmul (measured 290-980 ms against 35 ms per assignment at N = 16K on one core). What is fast is
a byte table: split each code into bytes; for every centroid c, byte position j and byte value v,
tabulate the similarity of v with c's j-th byte (a (bytes, 256, C) table, a few hundred KiB);
a query's similarity to every centroid is then the sum of its bytes' rows, which
``F.embedding_bag`` computes in one pass (8 row additions per query instead of a K = 63
matmul: 3-4x faster than the matmul). The majority-vote update is the transpose: count, per
cluster, the members of each byte value at each position (one ``index_add_`` of ones), then the
per-bit sums are those counts times the bits of the byte values.

Shapes: B batch, h heads, N length, b bits, C clusters, G = B·h, J = ceil(b / 8) bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hash_codes(q: Tensor, planes: Tensor) -> Tensor:
    """±1 codes (B, h, N, b) of queries q (B, h, N, d).

    ``planes`` (d + 1, b) holds one hyperplane normal per column and, in its last row, the
    threshold of each plane: bit = <q, normal> > threshold, as in the reference implementation.
    """
    normals, thresholds = planes[:-1], planes[-1]
    return torch.where(q @ normals > thresholds, 1.0, -1.0).to(q.dtype)


def hamming_kmeans(
    codes: Tensor, mask: Tensor, num_clusters: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means on ±1 codes (B, h, N, b) under Hamming distance.

    Returns the assignment (B, h, N), with -1 on padded queries (they join no cluster and never
    move a centroid), and the ±1 centroids (B, h, C, b) it was made against. ``iterations``
    counts assignment steps, as in the reference: iterations - 1 updates, then the final
    assignment. Each query goes to its nearest centroid, the first one on ties.

    Centroids start at the codes of valid queries spread evenly over each row's valid positions.
    A cluster left empty by an update is re-seeded with the code of the valid query farthest from
    its own centroid (a different query for each empty cluster, farthest first, the first
    position on ties), which keeps the whole procedure deterministic: only the hash planes are
    random. A row with fewer valid queries than clusters simply keeps the surplus clusters empty.
    """
    valid = mask[:, None, :].expand(codes.shape[:3])
    slots = byte_slots(codes)
    centroids = _initial_centroids(codes, mask, num_clusters)
    for _ in range(iterations - 1):
        assignment, similarity = assign(slots, centroids, valid)
        centroids = _update(codes, slots, assignment, similarity, mask, num_clusters)
    return assign(slots, centroids, valid)[0], centroids


def byte_slots(codes: Tensor) -> Tensor:
    """256 j + (byte j of each code) (B, h, N, J), with bit t of byte j = code bit 8j + t > 0:
    the row of each byte in a (J, 256) table of byte values."""
    bits = codes.shape[-1]
    ones = F.pad((codes > 0).float(), (0, -bits % 8)).unflatten(-1, (-1, 8))
    powers = 2.0 ** torch.arange(8, device=codes.device)
    offsets = 256.0 * torch.arange(ones.shape[-2], device=codes.device)
    return (ones @ powers + offsets).long()


def _byte_patterns(device: torch.device) -> Tensor:
    """(256, 8) ±1 bits of every byte value, lowest bit first."""
    values = torch.arange(256, device=device)
    return ((values[:, None] >> torch.arange(8, device=device)) & 1).float() * 2 - 1


def similarity_table(centroids: Tensor, scale: float = 1.0) -> Tensor:
    """(B, h, J, 256, C): scale · <byte value v, centroid c's byte j> over the bits of byte j.

    Bits past b (the padding of the last byte) are 0 in the padded centroids, so they add nothing.
    """
    bits = centroids.shape[-1]
    padded = F.pad(centroids.float(), (0, -bits % 8)).unflatten(-1, (-1, 8))
    return (_byte_patterns(centroids.device) * scale) @ padded.permute(0, 1, 3, 4, 2)


def assign(slots: Tensor, centroids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each query (first one on ties) and its similarity b - 2 * Hamming.

    slots (B, h, N, J) from :func:`byte_slots`, centroids (B, h, C, b) of ±1, valid (B, h, N).
    The similarities are small integers, exact in float32; each is scaled by C and tagged with
    C - 1 - c so that one ``amax`` (far cheaper than ``max`` with indices) yields both the
    largest similarity and, on ties, the first centroid holding it.
    """
    batch, heads, length, nbytes = slots.shape
    clusters = centroids.shape[-2]
    table = similarity_table(centroids, scale=clusters)
    table[:, :, 0] += torch.arange(clusters - 1, -1, -1, device=table.device, dtype=table.dtype)
    groups = torch.arange(batch * heads, device=slots.device).view(batch, heads, 1, 1)
    rows = (slots + groups * (nbytes * 256)).view(-1, nbytes)
    tagged = F.embedding_bag(rows, table.view(-1, clusters), mode="sum")
    best = tagged.amax(-1).long().view(batch, heads, length)
    assignment = clusters - 1 - best.remainder(clusters)
    similarity = best.div(clusters, rounding_mode="floor")
    return assignment.masked_fill(~valid, -1), similarity


def _gather_codes(codes: Tensor, index: Tensor) -> Tensor:
    """Codes (B, h, C, b) of the queries at ``index`` (B, h, C)."""
    return codes.gather(2, index.unsqueeze(-1).expand(*index.shape, codes.shape[-1]))


def _initial_centroids(codes: Tensor, mask: Tensor, num_clusters: int) -> Tensor:
    batch, heads = codes.shape[:2]
    lengths = mask.sum(-1, keepdim=True)
    valid_first = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    ranks = torch.arange(num_clusters, device=mask.device) * lengths // num_clusters
    start = valid_first.gather(1, ranks)
    return _gather_codes(codes, start[:, None, :].expand(batch, heads, num_clusters))


def _vote(slots: Tensor, assignment: Tensor, num_clusters: int, bits: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums of the members' ±1 codes (B, h, C, b) and member counts (B, h, C).

    Counts the members of each byte value at each byte position (padded queries count in a
    spare cluster C that is dropped), then sums the bits of those byte values.
    """
    batch, heads, length, nbytes = slots.shape
    spare = num_clusters + 1
    cluster = assignment.masked_fill(assignment < 0, num_clusters)
    groups = torch.arange(batch * heads, device=slots.device).view(batch, heads, 1)
    index = (slots + ((cluster + spare * groups) * (nbytes * 256)).unsqueeze(-1)).view(-1)
    counts = torch.zeros(batch * heads * spare * nbytes * 256, device=slots.device)
    counts.index_add_(0, index, torch.ones(1, device=slots.device).expand(index.shape[0]))
    sums = (counts.view(-1, 256) @ _byte_patterns(slots.device)).view(batch, heads, spare, -1)
    sizes = counts.view(batch, heads, spare, nbytes, 256)[:, :, :num_clusters, 0].sum(-1)
    return sums[:, :, :num_clusters, :bits], sizes


def _update(
    codes: Tensor, slots: Tensor, assignment: Tensor, similarity: Tensor, mask: Tensor,
    num_clusters: int,
) -> Tensor:
    batch, heads, length, bits = codes.shape
    sums, sizes = _vote(slots, assignment, num_clusters, bits)
    # A tied vote gives -1 (bit 0), as in the reference.
    voted = torch.where(sums > 0, 1.0, -1.0).to(codes.dtype)

    # Farthest first, the first position on ties: distance and position in one unique key, so
    # that a top-k (linear in N) gives the order a stable sort would.
    positions = torch.arange(length - 1, -1, -1, device=codes.device)
    key = ((bits - similarity) * length + positions).masked_fill(assignment < 0, -1)
    farthest_first = key.topk(min(num_clusters, length), dim=-1).indices
    empty = sizes == 0
    rank = empty.cumsum(-1) - 1
    # Only as many re-seeds as the row has valid queries: padded codes never become centroids.
    reseed = empty & (rank < mask.sum(-1)[:, None, None])
    seeds = _gather_codes(codes, farthest_first.gather(-1, rank.clamp(0, farthest_first.shape[-1] - 1)))
    return torch.where(reseed.unsqueeze(-1), seeds, voted)
