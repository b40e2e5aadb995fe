"""CAST's two clustering regimes: from token-to-surrogate affinities to cluster member indices.

Shapes: G leading dims (batch and heads, any number), Nc clusters, N tokens, κ (``size``) slots
per cluster. ``scores`` are cluster-major (G, Nc, N) so that a cluster's column is contiguous,
and padded tokens must already hold the lowest score (the caller fills them with the dtype's
minimum in place, which is cheaper than a masked copy here); ``mask`` (G, N), or broadcastable to
it, is True on real tokens. Both regimes return :class:`Clusters`: ``index`` (G, Nc, κ) token
positions and ``valid`` (G, Nc, κ), True where a slot holds a real token. Slots that are not
valid point at some token and must be ignored. Nothing here carries a gradient.

- ``topk``: every cluster takes its κ best-scoring tokens, so a token can sit in several clusters
  or in none. On a CPU the selection runs in two short stages (:func:`top_indices`).
- ``sa_topk`` (single assignment): a token sits in at most one cluster. Each round, every unplaced
  token proposes to its best cluster that still has room, and each cluster accepts its best
  proposers up to its room. After ``SA_ROUNDS`` rounds, tokens still unplaced fill the remaining
  free slots (best-scoring tokens first, free slots in cluster order), so with Nc·κ ≥ valid length
  every real token is placed exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Proposal rounds of sa_topk before the final fill; most tokens settle in the first two.
SA_ROUNDS = 3
# top_indices: entries per strided group of a row; its first stage picks among N / GROUP groups.
GROUP = 8


class Clusters(NamedTuple):
    index: Tensor
    valid: Tensor


def topk_clusters(scores: Tensor, mask: Tensor, size: int) -> Clusters:
    """Each cluster's ``size`` best tokens; ``valid`` marks the padding taken when too few are real."""
    index = top_indices(scores.detach(), size)
    valid = mask.unsqueeze(-2).expand_as(scores).gather(-1, index)
    return Clusters(index, valid)


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest entries along the last dim, unordered: a top-k set, as
    ``scores.topk(k, sorted=False).indices`` (which of tied entries is taken may differ).

    torch's CPU top-k walks every entry of a row through a scalar partial sort (10 ms for the
    (4, 4, 64, 4096) scores of a 4K layer with Nc = κ = 64, 2 cores). Here each row of n entries
    is cut into m = n / GROUP strided groups {j, j + m, ..., j + (GROUP − 1)·m}, and the k groups
    with the largest maxima hold a top-k set: the k-th largest group maximum t is at most the k-th
    largest entry v (those k maxima are k entries ≥ t), so an entry above v lies in a group whose
    maximum exceeds t, which is among the k chosen; and the chosen groups with maximum = t hold
    enough entries equal to t for the ties when v = t. Two top-k calls over GROUP·k and n / GROUP
    entries, a vectorised max and a gather replace the long one (5 ms for those scores). On other
    devices, for a row length that is not a multiple of GROUP, and where the GROUP·k candidates
    would be more than half the row, torch's top-k runs as it is.
    """
    n = scores.shape[-1]
    if scores.device.type != "cpu" or n % GROUP or 2 * GROUP * k > n:
        return scores.topk(k, dim=-1, sorted=False).indices
    m = n // GROUP
    grouped = scores.unflatten(-1, (GROUP, m))  # (..., GROUP, m): column j is group j
    groups = grouped.amax(dim=-2).topk(k, dim=-1, sorted=False).indices  # (..., k)
    members = grouped.gather(-1, groups.unsqueeze(-2).expand(*grouped.shape[:-1], k)).flatten(-2)
    pick = members.topk(k, dim=-1, sorted=False).indices  # into (GROUP, k) candidates
    return groups.gather(-1, pick % k) + m * (pick // k)


@torch.no_grad()
def sa_topk_clusters(scores: Tensor, mask: Tensor, size: int) -> Clusters:
    """Single assignment: each real token in at most one cluster, capacity ``size`` each."""
    lead, (nc, n) = scores.shape[:-2], scores.shape[-2:]
    mask = mask.expand(*lead, n).reshape(-1, n)
    scores = scores.detach().reshape(-1, nc, n).masked_fill(~mask.unsqueeze(1), float("-inf"))
    g, slots = scores.shape[0], nc * size
    tokens = torch.arange(n, device=scores.device).expand(g, n)
    fill = scores.new_zeros(g, nc + 1, dtype=torch.long)  # column nc counts tokens that sit out
    slot_of = torch.full((g, n), slots, dtype=torch.long, device=scores.device)  # slots = unplaced
    active = mask.clone()
    for _ in range(SA_ROUNDS):
        open_ = fill[:, :nc, None] < size
        best, cluster = scores.masked_fill(~open_, float("-inf")).max(dim=-2)
        proposes = active & (best > float("-inf"))
        cluster = torch.where(proposes, cluster, nc)
        # Group proposers by cluster, best score first: two stable sorts, no loop over clusters.
        proposal = torch.where(proposes, best, float("-inf"))
        by_score = proposal.argsort(dim=-1, descending=True, stable=True)
        order = by_score.gather(-1, cluster.gather(-1, by_score).argsort(dim=-1, stable=True))
        sorted_cluster = cluster.gather(-1, order)
        rank = tokens - torch.searchsorted(sorted_cluster, sorted_cluster)
        room = (size - fill).masked_fill_(torch.arange(nc + 1, device=fill.device) == nc, 0)
        taken = rank < room.gather(-1, sorted_cluster)
        slot = sorted_cluster * size + fill.gather(-1, sorted_cluster) + rank
        accepted = torch.zeros_like(active).scatter_(-1, order, taken)
        slot_of = torch.where(accepted, slot_of.scatter(-1, order, slot), slot_of)
        active &= ~accepted
        fill = fill.scatter_add(-1, cluster, accepted.long())
    slot_of = _fill_free_slots(scores, fill[:, :nc], slot_of, active, size)
    index = tokens.new_zeros(g, slots + 1).scatter_(-1, slot_of, tokens)
    valid = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, slot_of, True)
    shape = (*lead, nc, size)
    return Clusters(index[:, :slots].reshape(shape), valid[:, :slots].reshape(shape))


def _fill_free_slots(scores: Tensor, fill: Tensor, slot_of: Tensor, active: Tensor, size: int) -> Tensor:
    """Pair the m-th best unplaced token with the m-th free slot, all rows at once."""
    g, nc, n = scores.shape
    free = (torch.arange(size, device=fill.device) >= fill.unsqueeze(-1)).reshape(g, nc * size)
    free_slots = (~free).to(torch.uint8).argsort(dim=-1, stable=True)  # free slots first, in order
    best = torch.where(active, scores.amax(dim=-2), float("-inf"))
    waiting = best.argsort(dim=-1, descending=True, stable=True)  # unplaced tokens first, best first
    m = min(n, nc * size)
    waiting, free_slots = waiting[:, :m], free_slots[:, :m]
    placed = active.gather(-1, waiting) & free.gather(-1, free_slots)
    return slot_of.scatter(-1, waiting, torch.where(placed, free_slots, slot_of.gather(-1, waiting)))
