"""CAST's clustering regimes: which tokens each cluster holds, with padding anywhere in the row."""

import pytest
import torch

from cast.attention.cast.clustering import GROUP, SA_ROUNDS, sa_topk_clusters, top_indices, topk_clusters


def scores_and_mask(g=3, nc=4, n=20, seed=0, pad=0.3):
    """Cluster-major scores (g, nc, n), padding scattered anywhere and already at the minimum."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(g, nc, n, generator=gen)
    mask = torch.rand(g, n, generator=gen) > pad
    mask[:, 0] = True
    scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
    return scores, mask


def members(clusters, row):
    """Real tokens held by each cluster of one row, as lists (duplicates kept)."""
    index, valid = clusters.index[row], clusters.valid[row]
    return [index[c][valid[c]].tolist() for c in range(index.shape[0])]


@pytest.mark.parametrize("n,size", [(20, 6), (256, 6)])  # torch's top-k; the grouped one (top_indices)
def test_topk_clusters_hold_their_best_distinct_real_tokens(n, size):
    scores, mask = scores_and_mask(n=n)
    clusters = topk_clusters(scores, mask, size)
    assert clusters.index.shape == clusters.valid.shape == (3, 4, size)
    for row in range(3):
        real = mask[row].nonzero().flatten().tolist()
        for c, held in enumerate(members(clusters, row)):
            assert len(held) == len(set(held)) == min(size, len(real))
            best = sorted(real, key=lambda j: -scores[row, c, j].item())[:size]
            assert set(held) == set(best)


def adversarial_rows(kind: str, n: int) -> torch.Tensor:
    """(6, n) rows on which grouping by stride could go wrong, if the argument for it were wrong."""
    gen = torch.Generator().manual_seed(1)
    m = n // GROUP
    if kind == "random":
        return torch.randn(6, n, generator=gen)
    if kind == "ascending":  # the best entries all in the last groups' top members
        return torch.arange(n, dtype=torch.float).repeat(6, 1) + torch.arange(6).view(6, 1)
    if kind == "one-group":  # the best entries all in as few strided groups as they fit in
        rows = torch.randn(6, n, generator=gen)
        rows.view(6, GROUP, m)[:, :, :3] += 100.0
        return rows
    if kind == "ties":
        return torch.randint(0, 4, (6, n), generator=gen).float()
    # "padding": fewer real entries than k; the rest tie at the dtype's minimum
    rows = torch.full((6, n), torch.finfo(torch.float32).min)
    rows[:, ::37] = torch.randn(6, rows[:, ::37].shape[1], generator=gen)
    return rows


@pytest.mark.parametrize("kind", ["random", "ascending", "one-group", "ties", "padding"])
@pytest.mark.parametrize("n,k", [(256, 16), (512, 32), (200, 12)])
def test_top_indices_selects_a_top_k_set_of_distinct_positions(kind, n, k):
    assert 2 * GROUP * k <= n and n % GROUP == 0  # the grouped path, not torch's fallback
    rows = adversarial_rows(kind, n)
    # Scores reach it as permuted views of the cluster-major storage, as in CASTAttention.cluster.
    scores = rows.view(2, 3, n).transpose(0, 1)
    index = top_indices(scores, k)
    assert index.shape == (3, 2, k)
    assert (index.sort(-1).values.diff(dim=-1) > 0).all()  # distinct positions
    picked = scores.gather(-1, index).sort(-1).values
    assert torch.equal(picked, scores.topk(k, dim=-1).values.sort(-1).values)


def test_top_indices_falls_back_to_torch_where_groups_would_not_help():
    scores = torch.randn(4, 100)  # 100 is not a multiple of GROUP
    assert torch.equal(top_indices(scores, 5).sort(-1).values,
                       scores.topk(5, sorted=False).indices.sort(-1).values)


def test_topk_never_marks_padding_valid_when_short_of_real_tokens():
    scores, mask = scores_and_mask(n=10, pad=0.7)
    clusters = topk_clusters(scores, mask, size=8)
    held_mask = mask.unsqueeze(1).expand(-1, 4, -1).gather(-1, clusters.index)
    assert torch.equal(clusters.valid, held_mask)
    assert (clusters.valid.sum(-1) == mask.sum(-1, keepdim=True).clamp(max=8)).all()


@pytest.mark.parametrize("nc,size,n,pad", [
    (4, 5, 20, 0.0), (4, 5, 20, 0.4), (3, 8, 20, 0.2), (5, 4, 20, 0.0),
])
def test_sa_topk_places_every_real_token_exactly_once(nc, size, n, pad):
    scores, mask = scores_and_mask(g=4, nc=nc, n=n, pad=pad, seed=nc + size)
    assert nc * size >= n
    clusters = sa_topk_clusters(scores, mask, size)
    for row in range(4):
        held = [j for cluster in members(clusters, row) for j in cluster]
        assert sorted(held) == mask[row].nonzero().flatten().tolist()


def test_sa_topk_fills_the_last_free_slots_when_everyone_wants_the_same_clusters():
    """Every token ranks the clusters alike, so each round fills one cluster and the rounds alone
    cannot place everyone: the final fill must."""
    nc, size = SA_ROUNDS + 2, 3
    n = nc * size
    rank = torch.arange(nc, 0, -1, dtype=torch.float)[:, None] * torch.linspace(1, 2, n)[None, :]
    scores, mask = rank[None], torch.ones(1, n, dtype=torch.bool)
    clusters = sa_topk_clusters(scores, mask, size)
    assert clusters.valid.all()
    assert sorted(clusters.index.flatten().tolist()) == list(range(n))
    # The first cluster keeps the tokens that score highest for it.
    assert sorted(clusters.index[0, 0].tolist()) == list(range(n - size, n))


def test_sa_topk_gives_each_token_its_best_cluster_when_nothing_overflows():
    scores, mask = scores_and_mask(g=2, nc=4, n=12, pad=0.0)
    clusters = sa_topk_clusters(scores, mask, size=12)
    best = scores.argmax(dim=1)
    for row in range(2):
        for c, held in enumerate(members(clusters, row)):
            assert all(best[row, j] == c for j in held)


def test_sa_topk_with_too_few_slots_fills_every_slot_with_distinct_real_tokens():
    scores, mask = scores_and_mask(g=2, nc=3, n=20, pad=0.0)
    clusters = sa_topk_clusters(scores, mask, size=4)
    assert clusters.valid.all()
    for row in range(2):
        held = clusters.index[row].flatten().tolist()
        assert len(set(held)) == 12


def test_sa_topk_accepts_extra_leading_dimensions():
    scores, mask = scores_and_mask(g=6, nc=4, n=16, pad=0.25)
    flat = sa_topk_clusters(scores, mask, 4)
    shaped = sa_topk_clusters(scores.view(2, 3, 4, 16), mask.view(2, 3, 16), 4)
    assert torch.equal(shaped.index.reshape(6, 4, 4), flat.index)
    assert torch.equal(shaped.valid.reshape(6, 4, 4), flat.valid)
