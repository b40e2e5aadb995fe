"""Query hashing and K-means in Hamming space, shared by the two clustered mechanisms.

Vyas et al. (2020) cluster queries cheaply by hashing each into ``bits`` bits with random
hyperplanes and running Lloyd's K-means on the codes under Hamming distance. For ±1 codes x and c
of b bits the Hamming distance is (b - <x, c>) / 2, so the nearest centroid is the one of largest
similarity <x, c>. Everything here is index bookkeeping without gradient.

The reference implementation does this with popcounts in C++. PyTorch has no popcount, and
emulating one with shifts and masks on (N, C) int64 tensors is slower than the plain ±1 float
matmul (measured 290-980 ms against 35 ms per assignment at N = 16K on one core). What is fast is
a chunk table: cut each code into chunks of w bits (4 to 8, growing with N / C: see
:func:`chunk_width`); for every centroid c, chunk position j and chunk value v, tabulate the
similarity of v with c's j-th chunk (a (J, 2^w, C) table, a few hundred KiB at most); a query's
similarity to every centroid is then the sum of its chunks' rows, which ``torch.embedding_bag``
computes in one pass (8 to 16 row additions per query instead of a K = 63 matmul: 3-4x faster
than the matmul). The majority-vote update is the transpose: count, per cluster, the members
of each chunk value at each position (one ``scatter_add_`` of each query's validity: padded
queries weigh 0), then the per-bit sums are those counts times the bits of the chunk values (one
batched matmul), in the layout the next table is built from. Assignments and centroids are
exactly those of the ±1 matmul form.

Shapes: B batch, h heads, N length, b bits, C clusters, G = B·h, J = ceil(b / w) chunks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def hash_codes(q: Tensor, planes: Tensor) -> Tensor:
    """±1 codes (B, h, N, b) of queries q (B, h, N, d).

    ``planes`` (d + 1, b) holds one hyperplane normal per column and, in its last row, the
    threshold of each plane: bit = <q, normal> > threshold, as in the reference implementation.
    """
    bits = planes.shape[-1]
    # The product is made with the columns padded to a multiple of 16, and the codes are a view
    # of the first b: a GEMM of 63 columns costs 1.6x one of 64 (0.51 against 0.32 ms for 16K
    # queries of width 32 on 2 cores), and the rows of a view reshape without a copy.
    planes = F.pad(planes, (0, -bits % 16))
    normals, thresholds = planes[:-1], planes[-1]
    # <q, normal> - threshold in one matmul with a bias, then in place: 1.0 where > 0, else 0.0,
    # then ±1. A broadcast comparison and torch.where cost 10-15x more (measured at N = 4K).
    rows = torch.addmm(-thresholds.to(q.dtype), q.reshape(-1, q.shape[-1]), normals.to(q.dtype))
    return rows.gt_(0).mul_(2).sub_(1).view(*q.shape[:-1], -1)[..., :bits]


def hamming_kmeans(
    codes: Tensor, mask: Tensor, num_clusters: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means on ±1 codes (B, h, N, b) under Hamming distance.

    Returns the assignment (B, h, N), with -1 on padded queries (they join no cluster and never
    move a centroid), and the ±1 centroids (B, h, C, b) it was made against. ``iterations``
    counts assignment steps, as in the reference: iterations - 1 updates, then the final
    assignment; on a CPU the loop ends early once an assignment repeats the previous one (every
    later step would repeat it too), with the same result. Each query goes to its nearest
    centroid, the first one on ties.

    Centroids start at the codes of valid queries spread evenly over each row's valid positions.
    A cluster left empty by an update is re-seeded with the code of the valid query farthest from
    its own centroid (a different query for each empty cluster, farthest first, the first
    position on ties), which keeps the whole procedure deterministic: only the hash planes are
    random. A row with fewer valid queries than clusters simply keeps the surplus clusters empty.

    On a CPU with several torch threads and long rows the (batch, head) rows are split in two
    halves clustered at once, one in a worker thread, each with one intra-op thread: the
    iterations' small kernels keep two cores busy only in part, and each half's result is the
    same as the whole's.
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


# Below this many code bits in all a split costs more than it saves: the worker thread shares a
# core with torch's OpenMP thread, which spins for a while after every parallel op (the hash
# matmul just before, the projections). Measured on 2 Intel Xeon cores, hashing included, 4 x 4
# rows of 63 bits (ms with / without the split): 1K queries 23.6 / 20.0, 2K 32.6 / 32.1, 4K
# 52.0 / 52.9, 8K 98.9 / 112.0, 16K 205 / 216.
SPLIT_FROM = 3 << 20


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


def _kmeans(codes: Tensor, mask: Tensor, num_clusters: int, iterations: int,
            host_checks: bool | None = None) -> tuple[Tensor, Tensor]:
    # On a CPU the checks below cost nothing; on an accelerator they would synchronise, so there
    # every step takes the general path (same result). ``host_checks`` (default: on a CPU) decides.
    cpu = codes.device.type == "cpu" if host_checks is None else host_checks
    valid = None if cpu and bool(mask.all()) else mask[:, None, :].expand(codes.shape[:3])
    chunks = Chunks(codes, chunk_width(codes.shape[2], num_clusters), num_clusters, valid)
    centroids = chunks.chunked(_initial_centroids(codes, mask, num_clusters))
    previous = None
    for _ in range(iterations - 1):
        best = chunks.nearest(centroids)
        # Converged: an update is a function of ``best`` alone, so the centroids made from
        # ``previous`` are those ``best`` would vote, and every later iteration repeats this one.
        # Stopping here gives exactly the result of all the iterations (a host check: CPU only).
        if cpu and previous is not None and torch.equal(best, previous):
            break
        centroids = _update(codes, chunks, best, mask, valid, lazy=cpu)
        previous = best
    else:
        best = chunks.nearest(centroids)
    return chunks.assignment(best, valid), chunks.unchunked(centroids)


def chunk_width(length: int, num_clusters: int) -> int:
    """Bits per chunk: about log2(N / C) - 1, within [4, 8].

    A table holds C·2^w rows per chunk position whatever N, and the bag sums ceil(b / w) rows per
    query: the tables (built, and counted into by the vote) cost about what the sums do when
    C·2^w is near N / 2. Measured for C = 32 on 2 Intel Xeon cores, 4 x 4 rows of 63 bits, 10
    iterations (ms, widths 4 / 5 / 6 / 7 / 8): N = 128 2.8 / 3.1 / 3.8 / 4.7 / 9.2; 1K 13.1 /
    13.1 / 13.2 / 15.9 / 20.2; 4K 60.2 / 56.5 / 41.9 / 44.8 / 46.6; 8K 78.8 / 71.9 / 69.4 / 72.9
    / 78.2; 16K 199 / 176 / 154 / 145 / 148 (runs vary by about 10%).
    """
    return min(max((length // num_clusters).bit_length() - 2, 4), 8)


class Chunks:
    """Codes (B, h, N, b) cut into J = ceil(b / w) chunks of w bits (bit t of chunk j is code bit
    w·j + t > 0; bits past b are 0), and what every K-means iteration reuses, made once (each
    tensor op costs ~10 µs of dispatch, and an iteration at 1K queries is a dozen of them).

    Inside the iterations centroids stay *chunked*: (G·J, w, C), the ±1 bit t of chunk j of
    centroid c of group g at [g·J + j, t, c], and 0 for the bits past b. That is the layout both
    the table (a batched matmul with the chunk values' bit patterns) and the vote (the transposed
    matmul) use, so an iteration never reshapes or copies them.
    """

    def __init__(self, codes: Tensor, width: int, num_clusters: int, valid: Tensor | None = None):
        device, bits = codes.device, codes.shape[-1]
        batch, heads, length = codes.shape[:3]
        groups, nchunks, values = batch * heads, -(-bits // width), 1 << width
        self.bits, self.width, self.values, self.clusters = bits, width, values, num_clusters
        # nearest()'s keys hold a centroid's tag in their low bits: similarities are scaled by a
        # power of two at least C, so that the tag is key & (scale - 1), not a float remainder
        # (a serial op, 10x the cost of the bitwise and).
        self.scale = 1 << (num_clusters - 1).bit_length()
        self.shape, self.nchunks = (batch, heads, length), nchunks
        weights, offsets, self.scaled, self.tag, self.transposed, self.half = _tables(
            bits, width, num_clusters, self.scale, groups, device)
        slots = torch.addmm(offsets, codes.reshape(-1, bits).float(), weights).long()   # j·2^w + value
        # nearest(): the row of each chunk in the (G·J·2^w) rows of all groups' tables,
        # (g·J + j)·2^w + value, flat, with the offset of each query's bag: the arguments of
        # torch.embedding_bag, in int32 (half the index traffic of int64; F.embedding_bag would
        # flatten the rows and make the offsets anew at every call).
        group = torch.arange(groups, device=device).repeat_interleave(length)[:, None]
        self.rows = (slots.view(groups * length, nchunks) + group * (nchunks * values)).view(-1).int()
        self.bags = torch.arange(0, self.rows.numel(), nchunks, device=device, dtype=torch.int32)
        # vote(): the count of chunk j's value v in cluster c sits at (j·2^w + v)·C + c of its
        # group's row of counts, and c = C - 1 - (the tag of the best centroid). One row per group
        # makes the scatter parallel over the groups (a flat one runs on one core: 2.2x slower on 2).
        self.vote_top = (slots * num_clusters + (num_clusters - 1)).view(groups, length, nchunks)
        self.weights = (torch.ones(groups, length * nchunks, device=device) if valid is None
                        else valid.reshape(groups, length, 1).float().expand(-1, -1, nchunks).reshape(groups, -1))

    def chunked(self, centroids: Tensor) -> Tensor:
        """(B, h, C, b) ±1 -> (G·J, w, C), the bits past b 0."""
        padded = F.pad(centroids.float(), (0, self.nchunks * self.width - self.bits))
        per_chunk = padded.unflatten(-1, (self.nchunks, self.width)).permute(0, 1, 3, 4, 2)
        return per_chunk.reshape(-1, self.width, self.clusters)

    def unchunked(self, chunked: Tensor) -> Tensor:
        """(G·J, w, C) -> (B, h, C, b)."""
        batch, heads = self.shape[:2]
        per_chunk = chunked.view(batch, heads, self.nchunks, self.width, self.clusters)
        return per_chunk.permute(0, 1, 4, 2, 3).flatten(-2)[..., : self.bits]

    def nearest(self, chunked: Tensor) -> Tensor:
        """Per query (G·N,) the key S · (similarity b - 2·Hamming to its nearest centroid) + C - 1 -
        that centroid's index (the first one on ties), S = ``scale``: one ``embedding_bag`` over the
        table rows of its chunks, then one ``amax`` (far cheaper than ``max`` with indices). Small
        integers, exact in float32, returned as int64."""
        table = torch.baddbmm(self.tag, self.scaled, chunked)
        sums = torch.embedding_bag(table.view(-1, self.clusters), self.rows, self.bags, False, 0)[0]
        return sums.amax(-1).long()

    def assignment(self, best: Tensor, valid: Tensor | None) -> Tensor:
        """The nearest centroid (B, h, N) of each query, -1 on padded ones."""
        assignment = ((self.clusters - 1) - (best & (self.scale - 1))).view(self.shape)
        return assignment if valid is None else assignment.masked_fill(~valid, -1)

    def similarity(self, best: Tensor) -> Tensor:
        """b - 2·Hamming (B, h, N) of each query to its nearest centroid."""
        return (best >> (self.scale.bit_length() - 1)).view(self.shape)

    def vote(self, best: Tensor) -> tuple[Tensor, Tensor]:
        """The members' majority (G·J, w, C): +1 where more of a cluster's valid members have the
        bit than not, else -1 (a tied vote gives bit 0, as in the reference), 0 past b; and the
        member counts (G, C). Counts the members of each chunk value at each chunk position
        (one ``scatter_add_``), then sums the bits of those values (one batched matmul)."""
        groups = self.weights.shape[0]
        index = self.vote_top - (best & (self.scale - 1)).view(groups, -1, 1)
        counts = self.weights.new_zeros(groups, self.tag.numel() // groups)
        counts = counts.scatter_add_(1, index.view(groups, -1), self.weights).view(-1, self.values, self.clusters)
        voted = torch.bmm(self.transposed, counts).sub_(self.half).sign_()
        sizes = counts.view(-1, self.nchunks, self.values, self.clusters)[:, 0].sum(1)
        return voted, sizes


@lru_cache(maxsize=16)
def _tables(bits: int, width: int, num_clusters: int, scale: int, groups: int,
            device: torch.device) -> tuple[Tensor, ...]:
    """What :class:`Chunks` needs that depends on the shapes only (a layer calls with the same
    ones at every step; made afresh they cost a few dozen small ops): the chunk-value matmul's
    weights and bias, and the tables' ``scaled``, ``tag``, ``transposed`` and ``half``. Read only."""
    nchunks, values = -(-bits // width), 1 << width
    # value of chunk j = sum over its bits t of 2^t (x + 1) / 2: one matmul of the ±1 codes.
    bit = torch.arange(bits, device=device)
    in_chunk = bit[:, None] // width == torch.arange(nchunks, device=device)
    weights = in_chunk * 2.0 ** (bit % width)[:, None]
    offsets = float(values) * torch.arange(nchunks, device=device) + weights.sum(0) / 2
    # ±1 bits of every chunk value, 0 for the bits past b (in the last chunk only).
    patterns = ((torch.arange(values, device=device)[:, None] >> torch.arange(width, device=device)) & 1) * 2.0 - 1
    real = (torch.arange(nchunks * width, device=device) < bits).float().view(nchunks, 1, width)
    patterns = patterns * real                                                       # (J, 2^w, w)
    # nearest(): similarities times scale, and C - 1 - c added once (in chunk 0's rows) as the
    # tie-break tag of centroid c.
    scaled = (patterns * scale).repeat(groups, 1, 1)                                 # (G·J, 2^w, w)
    tag = torch.zeros(nchunks, values, num_clusters, device=device)
    tag[0] += torch.arange(num_clusters - 1, -1, -1, device=device, dtype=tag.dtype)
    # vote(): the bits of each chunk value, and half of each real bit (0 past b) for the sign.
    transposed = patterns.transpose(1, 2).repeat(groups, 1, 1)                      # (G·J, w, 2^w)
    half = (real / 2).transpose(1, 2).repeat(groups, 1, 1)                          # (G·J, w, 1)
    return weights / 2, offsets, scaled, tag.repeat(groups, 1, 1), transposed, half


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


def _update(
    codes: Tensor, chunks: Chunks, best: Tensor, mask: Tensor, valid: Tensor | None, lazy: bool = False,
) -> Tensor:
    """The voted centroids (chunked), empty clusters re-seeded. ``lazy``: skip the re-seeding when
    no cluster is empty (a host check, for a CPU only)."""
    batch, heads, length, bits = codes.shape
    num_clusters = chunks.clusters
    voted, sizes = chunks.vote(best)
    if lazy and bool(sizes.all()):
        return voted
    empty = (sizes == 0).view(batch, heads, num_clusters)

    # Farthest first, the first position on ties: distance and position in one unique key, so
    # that a top-k (linear in N) gives the order a stable sort would.
    positions = torch.arange(length - 1, -1, -1, device=codes.device)
    key = (bits - chunks.similarity(best)) * length + positions
    if valid is not None:
        key = key.masked_fill(~valid, -1)
    farthest_first = key.topk(min(num_clusters, length), dim=-1).indices
    rank = empty.cumsum(-1) - 1
    # Only as many re-seeds as the row has valid queries: padded codes never become centroids.
    reseed = empty & (rank < mask.sum(-1)[:, None, None])
    seeds = _gather_codes(codes, farthest_first.gather(-1, rank.clamp(0, farthest_first.shape[-1] - 1)))
    chunked = voted.view(batch * heads, chunks.nchunks, chunks.width, num_clusters)
    seeded = chunks.chunked(seeds).view_as(chunked)
    return torch.where(reseed.view(batch * heads, 1, 1, num_clusters), seeded, chunked).view_as(voted)
