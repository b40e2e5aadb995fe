"""Query hashing and K-means in Hamming space, shared by the two clustered mechanisms.

Vyas et al. (2020) cluster queries cheaply by hashing each into ``bits`` bits with random
hyperplanes and running Lloyd's K-means on the codes under Hamming distance. Codes are kept as
±1 floats, so with b bits the Hamming distance is (b - <x, c>) / 2: assignment is one batched
matmul and an argmax, and the centroid update is a bitwise majority vote (a matmul of the one-hot
memberships with the codes, then a sign). Everything here is index bookkeeping without gradient.

Shapes: B batch, h heads, N length, d head width, b bits, C clusters.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hash_codes(q: Tensor, planes: Tensor) -> Tensor:
    """±1 codes (B, h, N, b) of queries q (B, h, N, d).

    ``planes`` (d + 1, b) holds one hyperplane normal per column and, in its last row, the
    threshold of each plane: bit = <q, normal> > threshold, as in the reference implementation.
    """
    normals, thresholds = planes[:-1], planes[-1]
    return torch.where(q @ normals > thresholds, 1.0, -1.0).to(q.dtype)


def memberships(assignment: Tensor, num_clusters: int, dtype: torch.dtype) -> Tensor:
    """One-hot (B, h, N, C) of ``assignment`` (B, h, N); unassigned queries (-1) get a zero row."""
    clusters = torch.arange(num_clusters, device=assignment.device)
    return (assignment.unsqueeze(-1) == clusters).to(dtype)


def hamming_kmeans(
    codes: Tensor, mask: Tensor, num_clusters: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means on ±1 codes (B, h, N, b) under Hamming distance.

    Returns the assignment (B, h, N), with -1 on padded queries (they join no cluster and never
    move a centroid), and the centroids (B, h, C, b) it was made against. ``iterations`` counts
    assignment steps, as in the reference: iterations - 1 updates, then the final assignment.

    Centroids start at the codes of valid queries spread evenly over each row's valid positions.
    A cluster left empty by an update is re-seeded with the code of the valid query farthest from
    its own centroid (a different query for each empty cluster, farthest first), which keeps the
    whole procedure deterministic: only the hash planes are random. A row with fewer valid
    queries than clusters simply keeps the surplus clusters empty.
    """
    valid = mask[:, None, :].expand(codes.shape[:3])
    centroids = _initial_centroids(codes, mask, num_clusters)
    for _ in range(iterations - 1):
        assignment, similarity = _assign(codes, centroids, valid)
        centroids = _update(codes, assignment, similarity, mask, centroids.shape[-2])
    return _assign(codes, centroids, valid)[0], centroids


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


def _assign(codes: Tensor, centroids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each query (first one on ties) and its similarity b - 2 * Hamming."""
    similarity, assignment = (codes @ centroids.transpose(-1, -2)).max(-1)
    return assignment.masked_fill(~valid, -1), similarity


def _update(
    codes: Tensor, assignment: Tensor, similarity: Tensor, mask: Tensor, num_clusters: int
) -> Tensor:
    bits = codes.shape[-1]
    members = memberships(assignment, num_clusters, codes.dtype)
    # A tied vote gives -1 (bit 0), as in the reference.
    voted = torch.where(members.transpose(-1, -2) @ codes > 0, 1.0, -1.0).to(codes.dtype)

    empty = members.sum(2) == 0
    distance = (bits - similarity).masked_fill(assignment < 0, -1.0)
    farthest_first = torch.argsort(distance, dim=-1, descending=True, stable=True)
    rank = empty.cumsum(-1) - 1
    # Only as many re-seeds as the row has valid queries: padded codes never become centroids.
    reseed = empty & (rank < mask.sum(-1)[:, None, None])
    seeds = _gather_codes(codes, farthest_first.gather(-1, rank.clamp(0, codes.shape[2] - 1)))
    return torch.where(reseed.unsqueeze(-1), seeds, voted)
