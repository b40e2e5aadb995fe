"""Query hashing and K-means in Hamming space, shared by the two clustered mechanisms.

Vyas et al. (2020) cluster queries cheaply by hashing each into ``bits`` bits with random
hyperplanes and running Lloyd's K-means on the codes under Hamming distance. For ±1 codes x and c
of b bits the Hamming distance is (b - <x, c>) / 2, so the nearest centroid is the one of largest
similarity <x, c>. Everything here is index bookkeeping without gradient.

The reference implementation does this with popcounts in C++. PyTorch has no popcount, and
emulating one with shifts and masks on (N, C) int64 tensors is slower than the plain ±1 float
matmul (measured 290-980 ms against 35 ms per assignment at N = 16K on one core). What is fast is
a chunk table: cut each code into chunks of w bits (bytes from 4K queries up, nibbles below, see
``WIDE_FROM``); for every centroid c, chunk position j and chunk value v, tabulate the similarity
of v with c's j-th chunk (a (J, 2^w, C) table, a few hundred KiB at most); a query's similarity
to every centroid is then the sum of its chunks' rows, which ``F.embedding_bag`` computes in one
pass (8 row additions per query instead of a K = 63 matmul: 3-4x faster than the matmul). The
majority-vote update is the transpose: count, per cluster, the members of each chunk value at
each position (one ``scatter_add_`` of ones), then the per-bit sums are those counts times the
bits of the chunk values. Assignments and centroids are exactly those of the ±1 matmul form.

Shapes: B batch, h heads, N length, b bits, C clusters, G = B·h, J = ceil(b / w) chunks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor


def hash_codes(q: Tensor, planes: Tensor) -> Tensor:
    """±1 codes (B, h, N, b) of queries q (B, h, N, d).

    ``planes`` (d + 1, b) holds one hyperplane normal per column and, in its last row, the
    threshold of each plane: bit = <q, normal> > threshold, as in the reference implementation.
    """
    normals, thresholds = planes[:-1], planes[-1]
    # <q, normal> - threshold in one matmul with a bias, then in place: 1.0 where > 0, else 0.0,
    # then ±1. A broadcast comparison and torch.where cost 10-15x more (measured at N = 4K).
    rows = torch.addmm(-thresholds.to(q.dtype), q.reshape(-1, q.shape[-1]), normals.to(q.dtype))
    return rows.gt_(0).mul_(2).sub_(1).view(*q.shape[:-1], -1)


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

    On a CPU with several torch threads the (batch, head) rows are split in two halves clustered
    at once, one in a worker thread, each with one intra-op thread: the table sums and vote
    counts are serial kernels (no intra-op parallelism), and each half's result is the same as
    the whole's.
    """
    split = _halves(codes, mask)
    if split is None:
        return _kmeans(codes, mask, num_clusters, iterations)
    dim, (first, second) = split
    # Each half on one core: with intra-op threads as well, the two halves' kernels would each
    # start parallel regions on both cores and wait on each other (measured at N = 1K: 39 ms a
    # call with them, 26 ms without; the same at 16K).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pending = _worker().submit(_one_thread, num_clusters, iterations, *second)
        done = _kmeans(*first, num_clusters, iterations)
        other = pending.result()
    finally:
        torch.set_num_threads(threads)
    return torch.cat([done[0], other[0]], dim), torch.cat([done[1], other[1]], dim)


def _one_thread(num_clusters: int, iterations: int, codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    torch.set_num_threads(1)  # the worker thread's own setting
    return _kmeans(codes, mask, num_clusters, iterations)


# Below this many code bits in all a split costs more than it saves (measured at N = 1K: 16 rows
# of 1,024 queries x 63 bits gain 1.4x).
SPLIT_FROM = 1 << 16


@cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="hamming-kmeans")


@cache
def _per_thread_counts() -> bool:
    """Whether torch's intra-op thread count is set per thread (the OpenMP backend). With the
    native backend it is fixed once parallel work has started, and the halves would compete."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _halves(codes: Tensor, mask: Tensor):
    """(dim, ((codes, mask), (codes, mask))): two halves over heads, else over the batch; or
    None where a split does not pay (an accelerator, one torch thread, small inputs, one row, a
    thread count that cannot be lowered per thread)."""
    batch, heads = codes.shape[:2]
    if (codes.device.type != "cpu" or torch.get_num_threads() < 2 or codes.numel() < SPLIT_FROM
            or not _per_thread_counts()):
        return None
    if heads > 1:
        cut = heads // 2
        return 1, ((codes[:, :cut], mask), (codes[:, cut:], mask))
    if batch > 1:
        cut = batch // 2
        return 0, ((codes[:cut], mask[:cut]), (codes[cut:], mask[cut:]))
    return None


def _kmeans(codes: Tensor, mask: Tensor, num_clusters: int, iterations: int) -> tuple[Tensor, Tensor]:
    # On a CPU the checks below cost nothing; on an accelerator they would synchronise, so there
    # every step takes the general path (same result).
    cpu = codes.device.type == "cpu"
    valid = None if cpu and bool(mask.all()) else mask[:, None, :].expand(codes.shape[:3])
    chunks = Chunks(codes, 8 if codes.shape[2] >= WIDE_FROM else 4, num_clusters)
    centroids = _initial_centroids(codes, mask, num_clusters)
    for _ in range(iterations - 1):
        assignment, similarity = assign(chunks, centroids, valid)
        centroids = _update(codes, chunks, assignment, similarity, mask, num_clusters, lazy=cpu)
    return assign(chunks, centroids, valid)[0], centroids


# Chunk width by length: a table holds C·2^w rows per chunk position, whatever N, and the bag
# sums ceil(b / w) rows per query; below about 2K queries the 256-row byte tables cost more to
# build and count into than the twice longer sums over 16-row nibble tables.
WIDE_FROM = 4096


class Chunks:
    """Codes (B, h, N, b) cut into J = ceil(b / w) chunks of w bits (bit t of chunk j is code bit
    w·j + t > 0; bits past b are 0): ``slots`` (B, h, N, J) = 2^w·j + value of chunk j, the row
    of each chunk in a (J, 2^w) table, and ``patterns`` (2^w, w), the ±1 bits of every value.
    What every K-means iteration reuses is made here once (each tensor op costs ~10 µs of
    dispatch, and an iteration has a few dozen of them at 1K queries)."""

    def __init__(self, codes: Tensor, width: int, num_clusters: int):
        device, bits = codes.device, codes.shape[-1]
        batch, heads, length = codes.shape[:3]
        self.width, self.values = width, 1 << width
        # value of chunk j = sum over its bits t of 2^t (x + 1) / 2: one matmul of the ±1 codes.
        bit = torch.arange(bits, device=device)
        nchunks = -(-bits // width)
        in_chunk = bit[:, None] // width == torch.arange(nchunks, device=device)
        weights = in_chunk * 2.0 ** (bit % width)[:, None]
        offsets = float(self.values) * torch.arange(nchunks, device=device) + weights.sum(0) / 2
        values = torch.addmm(offsets, codes.reshape(-1, bits).float(), weights / 2)
        self.slots = values.long().view(batch, heads, length, nchunks)
        # The same rows in the tables of all (batch, head) pairs stacked, for the bag sums.
        groups = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1)
        self.rows = (self.slots + groups * (nchunks * self.values)).view(-1, nchunks)
        values = torch.arange(self.values, device=device)
        self.patterns = ((values[:, None] >> torch.arange(width, device=device)) & 1).float() * 2 - 1
        # assign(): similarities scaled by C, and C - 1 - c added once (in chunk 0's rows) as the
        # tie-break tag of centroid c.
        self.scaled = (self.patterns * num_clusters).expand(batch * heads * nchunks, -1, -1)
        tag = torch.zeros(nchunks, self.values, num_clusters, device=device)
        tag[0] += torch.arange(num_clusters - 1, -1, -1, device=device, dtype=tag.dtype)
        self.tag = tag.expand(batch * heads, -1, -1, -1).reshape(-1, self.values, num_clusters)
        # _vote(): the count of chunk j's value in cluster c of group g sits at
        # ((g·(C + 1) + c)·J + j)·2^w + value; C + 1 is a spare cluster for padded queries.
        self.vote_base = (self.slots + groups * ((num_clusters + 1) * nchunks * self.values)).view(-1, nchunks)
        self.ones = torch.ones(self.vote_base.numel(), device=device)

    def table(self, centroids: Tensor) -> Tensor:
        """(B·h·J, 2^w, C): C · <chunk value v, centroid c's chunk j> over the chunk's bits, plus
        the tag C - 1 - c in chunk 0. Bits past b are 0 in the padded centroids: they add nothing."""
        bits = centroids.shape[-1]
        padded = F.pad(centroids.float(), (0, -bits % self.width)).unflatten(-1, (-1, self.width))
        per_chunk = padded.permute(0, 1, 3, 4, 2).reshape(self.tag.shape[0], self.width, -1)
        return torch.baddbmm(self.tag, self.scaled, per_chunk)


def assign(chunks: Chunks, centroids: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each query (first one on ties) and its similarity b - 2 * Hamming.

    centroids (B, h, C, b) of ±1, valid (B, h, N) or None when every query is valid. The
    similarities are small integers, exact in float32; each is scaled by C and tagged with
    C - 1 - c so that one ``amax`` (far cheaper than ``max`` with indices) yields both the largest
    similarity and, on ties, the first centroid holding it.
    """
    batch, heads, length, _ = chunks.slots.shape
    clusters = centroids.shape[-2]
    tagged = F.embedding_bag(chunks.rows, chunks.table(centroids).view(-1, clusters), mode="sum")
    best = tagged.amax(-1).long().view(batch, heads, length)
    assignment = (clusters - 1) - best.remainder(clusters)
    similarity = best.div(clusters, rounding_mode="floor")
    return (assignment if valid is None else assignment.masked_fill(~valid, -1)), similarity


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


def _vote(chunks: Chunks, assignment: Tensor, num_clusters: int, bits: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums of the members' ±1 codes (B, h, C, b) and member counts (B, h, C).

    Counts the members of each chunk value at each chunk position (padded queries count in a
    spare cluster C that is dropped), then sums the bits of those values.
    """
    batch, heads, length, nchunks = chunks.slots.shape
    spare = num_clusters + 1
    cluster = assignment.masked_fill(assignment < 0, num_clusters).view(-1, 1)
    index = torch.add(chunks.vote_base, cluster, alpha=nchunks * chunks.values).view(-1)
    counts = chunks.ones.new_zeros(batch * heads * spare * nchunks * chunks.values)
    counts.scatter_add_(0, index, chunks.ones)
    counts = counts.view(batch, heads, spare, nchunks, chunks.values)
    sums = F.linear(counts, chunks.patterns.t()).flatten(-2)[:, :, :num_clusters, :bits]
    return sums, counts[:, :, :num_clusters, 0].sum(-1)


def _update(
    codes: Tensor, chunks: Chunks, assignment: Tensor, similarity: Tensor, mask: Tensor,
    num_clusters: int, lazy: bool = False,
) -> Tensor:
    """The voted centroids, empty clusters re-seeded. ``lazy``: skip the re-seeding when no
    cluster is empty (a host check, for a CPU only)."""
    batch, heads, length, bits = codes.shape
    sums, sizes = _vote(chunks, assignment, num_clusters, bits)
    # A tied vote gives -1 (bit 0), as in the reference.
    voted = torch.where(sums > 0, 1.0, -1.0).to(codes.dtype)
    empty = sizes == 0
    if lazy and not bool(empty.any()):
        return voted

    # Farthest first, the first position on ties: distance and position in one unique key, so
    # that a top-k (linear in N) gives the order a stable sort would.
    positions = torch.arange(length - 1, -1, -1, device=codes.device)
    key = ((bits - similarity) * length + positions).masked_fill(assignment < 0, -1)
    farthest_first = key.topk(min(num_clusters, length), dim=-1).indices
    rank = empty.cumsum(-1) - 1
    # Only as many re-seeds as the row has valid queries: padded codes never become centroids.
    reseed = empty & (rank < mask.sum(-1)[:, None, None])
    seeds = _gather_codes(codes, farthest_first.gather(-1, rank.clamp(0, farthest_first.shape[-1] - 1)))
    return torch.where(reseed.unsqueeze(-1), seeds, voted)
