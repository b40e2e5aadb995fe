"""Clustered attention: Hamming K-means, exact limits, padding, determinism, training.

Also home of helpers the iclustered and fastmax tests share: ``largest_tensor`` (no N x N
tensor is ever built) and ``fit_briefly`` (a mechanism trains inside a model with Adam).
"""

from __future__ import annotations

import math

import pytest
import torch

from cast.attention import clustered as clustered_module
from cast.attention.clustered import ClusteredAttention
from cast.attention import hamming
from cast.attention.hamming import Chunks, hamming_kmeans, hash_codes
from cast.attention.vanilla import VanillaAttention
from tests.attention.reference import assert_bf16_finite, exact, fit_briefly, largest_tensor, random_batch


def refuse_to_cluster(*args):
    pytest.fail("a sequence short enough for the exact fallback went through the clustering")


def make(seed=0, **options):
    torch.manual_seed(seed)
    return ClusteredAttention(32, 4, **options).eval()


def test_assignment_is_the_nearest_centroid_in_hamming_distance():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (2, 3, 40, 16), generator=g).float() * 2 - 1
    mask = torch.arange(40)[None, :] < torch.tensor([[40], [23]])
    assignment, centroids = hamming_kmeans(codes, mask, num_clusters=5, iterations=4)
    hamming = (codes[:, :, :, None, :] != centroids[:, :, None, :, :]).sum(-1)
    valid = mask[:, None, :].expand_as(assignment)
    own = hamming.gather(-1, assignment.clamp(min=0)[..., None])[..., 0]
    assert (own[valid] == hamming.min(-1).values[valid]).all()
    assert (assignment[~valid] == -1).all(), "padded queries must join no cluster"
    assert set(centroids.unique().tolist()) == {-1.0, 1.0}


def assign(chunks, centroids, valid):
    """Nearest centroid (B, h, N) of each query (first one on ties, -1 where not ``valid``) and
    its similarity b - 2·Hamming, for centroids (B, h, C, b) of ±1, through the chunk tables."""
    best = chunks.nearest(chunks.chunked(centroids))
    return chunks.assignment(best, valid), chunks.similarity(best)


def random_codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def lloyd_reference(codes, mask, num_clusters, iterations):
    """The ±1 float form, one (batch, head) at a time: assignment by a matmul and the first
    argmax, update by the sign of the members' sum, empty clusters re-seeded farthest first."""
    batch, heads, length, bits = codes.shape
    assignment = torch.full((batch, heads, length), -1)
    centroids = torch.empty(batch, heads, num_clusters, bits)
    for b in range(batch):
        valid = torch.nonzero(mask[b])[:, 0]
        for h in range(heads):
            x = codes[b, h, valid]
            centroid = x[torch.arange(num_clusters) * len(valid) // num_clusters]
            for step in range(iterations):
                similarity = x @ centroid.T
                own = similarity.argmax(-1)
                if step == iterations - 1:
                    break
                distance = (bits - similarity.gather(1, own[:, None])[:, 0]).tolist()
                farthest = sorted(range(len(valid)), key=lambda i: (-distance[i], i))
                votes = [x[own == c].sum(0) for c in range(num_clusters)]
                voted = torch.where(torch.stack(votes) > 0, 1.0, -1.0)
                empty = [c for c in range(num_clusters) if not (own == c).any()]
                for rank, c in enumerate(empty[: len(valid)]):
                    voted[c] = x[farthest[rank]]
                centroid = voted
            assignment[b, h, valid], centroids[b, h] = own, centroid
    return assignment, centroids


@pytest.mark.parametrize("width", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("bits", [13, 63])
def test_table_assignment_equals_the_float_matmul_form(width, bits):
    codes = random_codes((2, 3, 50, bits), seed=bits)
    # Centroids copied from codes make exact ties with other codes likely at 13 bits.
    centroids = torch.cat([codes[:, :, :6], random_codes((2, 3, 3, bits), seed=1)], dim=2)
    valid = torch.ones(2, 3, 50, dtype=torch.bool)
    assignment, similarity = assign(Chunks(codes, width, centroids.shape[2]), centroids, valid)
    expected = codes @ centroids.transpose(-1, -2)
    assert torch.equal(assignment, expected.argmax(-1)), "nearest centroid, the first one on ties"
    assert torch.equal(similarity.float(), expected.amax(-1))


@pytest.mark.parametrize("width", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("bits,clusters,valid", [(63, 5, (40, 23)), (13, 8, (40, 5)), (20, 30, (40, 40))])
def test_kmeans_equals_the_float_matmul_lloyd(monkeypatch, width, bits, clusters, valid):
    monkeypatch.setattr(hamming, "chunk_width", lambda length, num_clusters: width)
    codes = random_codes((2, 2, 40, bits), seed=clusters)
    mask = torch.arange(40)[None, :] < torch.tensor(valid)[:, None]
    assignment, centroids = hamming_kmeans(codes, mask, clusters, iterations=6)
    expected_assignment, expected_centroids = lloyd_reference(codes, mask, clusters, iterations=6)
    assert torch.equal(assignment, expected_assignment)
    assert torch.equal(centroids, expected_centroids)


@pytest.mark.parametrize("bits", [13, 63, 64])
def test_hash_codes_are_the_signs_against_each_plane(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randn(2, 24, 3, 8, generator=g).transpose(1, 2)  # heads split from a projection
    planes = torch.randn(9, bits, generator=g)
    codes = hash_codes(q, planes)
    expected = torch.where(q @ planes[:-1] > planes[-1], 1.0, -1.0)
    assert codes.shape == (2, 3, 24, bits) and torch.equal(codes, expected)


def test_chunk_width_grows_with_the_queries_per_cluster():
    widths = [hamming.chunk_width(n, 32) for n in (64, 512, 1024, 2048, 4096, 8192, 16384, 65536)]
    assert widths == [4, 4, 4, 5, 6, 7, 8, 8]


@pytest.mark.parametrize("bits,clusters,valid", [(63, 5, (40, 23)), (20, 30, (40, 40))])
def test_kmeans_without_host_checks_equals_the_float_matmul_lloyd(bits, clusters, valid):
    """The path an accelerator takes (no host syncs: every query weighed by its mask, empty
    clusters looked for at every update) gives the same clusters."""
    codes = random_codes((2, 2, 40, bits), seed=clusters)
    mask = torch.arange(40)[None, :] < torch.tensor(valid)[:, None]
    assignment, centroids = hamming._kmeans(codes, mask, clusters, iterations=6, host_checks=False)
    expected_assignment, expected_centroids = lloyd_reference(codes, mask, clusters, iterations=6)
    assert torch.equal(assignment, expected_assignment)
    assert torch.equal(centroids, expected_centroids)


def test_kmeans_stops_once_converged_with_the_result_of_every_iteration(monkeypatch):
    """On a CPU the Lloyd loop ends when an assignment repeats the previous one: the result is
    exactly that of all the iterations (the reference's, and the path without host checks)."""
    codes = random_codes((2, 2, 40, 63), seed=3)
    mask = torch.arange(40)[None, :] < torch.tensor([40, 29])[:, None]
    calls = []
    nearest = Chunks.nearest
    monkeypatch.setattr(Chunks, "nearest", lambda self, c: calls.append(1) or nearest(self, c))
    assignment, centroids = hamming_kmeans(codes, mask, 5, iterations=30)
    assert len(calls) < 30, "the loop must stop early for this test to check anything"
    calls.clear()
    unchecked = hamming._kmeans(codes, mask, 5, iterations=30, host_checks=False)
    assert len(calls) == 30
    expected_assignment, expected_centroids = lloyd_reference(codes, mask, 5, iterations=30)
    for got in ((assignment, centroids), unchecked):
        assert torch.equal(got[0], expected_assignment)
        assert torch.equal(got[1], expected_centroids)


@pytest.mark.parametrize("heads", [1, 3], ids=["batch-halves", "head-halves"])
def test_kmeans_split_over_a_worker_thread_equals_the_float_matmul_lloyd(monkeypatch, heads):
    """The CPU split (half the rows in a worker thread) changes nothing, over heads or batch."""
    monkeypatch.setattr(hamming, "SPLIT_FROM", 0)
    torch.set_num_threads(2)                   # the conftest fixture restores the count
    codes = random_codes((3, heads, 40, 63), seed=heads)
    mask = torch.arange(40)[None, :] < torch.tensor([40, 17, 33])[:, None]
    assert hamming._halves(codes, mask) is not None, "the split path must be the one under test"
    assignment, centroids = hamming_kmeans(codes, mask, 6, iterations=5)
    expected_assignment, expected_centroids = lloyd_reference(codes, mask, 6, iterations=5)
    assert torch.equal(assignment, expected_assignment)
    assert torch.equal(centroids, expected_centroids)
    assert torch.get_num_threads() == 2, "the halves run on one thread each, then the count is restored"


def test_kmeans_recovers_well_separated_groups_even_from_a_bad_start():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=g) * 4
    # Every fourth token in one group: the evenly spread initial centroids (tokens 0, 12, 24,
    # 36) all start in group 0, so only re-seeding the empty clusters can find the others.
    group = torch.arange(48) % 4
    q = (centres[group] + 0.01 * torch.randn(48, 8, generator=g))[None, None]
    mask = torch.ones(1, 48, dtype=torch.bool)
    planes = torch.randn(9, 63, generator=g)
    assignment, _ = hamming_kmeans(hash_codes(q, planes), mask, num_clusters=4, iterations=10)
    same_cluster = assignment[0, 0, :, None] == assignment[0, 0, None, :]
    assert torch.equal(same_cluster, group[:, None] == group[None, :])


def test_padded_queries_never_move_the_clustering():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2, (2, 2, 30, 12), generator=g).float() * 2 - 1
    mask = torch.arange(30)[None, :] < torch.tensor([[30], [2]])
    noisy = codes.clone()
    noisy[1, :, 2:] *= -1
    first, centroids_first = hamming_kmeans(codes, mask, num_clusters=6, iterations=5)
    second, centroids_second = hamming_kmeans(noisy, mask, num_clusters=6, iterations=5)
    assert torch.equal(first, second) and torch.equal(centroids_first, centroids_second)


def test_one_query_per_cluster_equals_exact_attention_through_the_clustering_path(monkeypatch):
    calls = []
    kmeans = clustered_module.hamming_kmeans
    monkeypatch.setattr(clustered_module, "hamming_kmeans", lambda *a: calls.append(1) or kmeans(*a))
    module = make(num_clusters=12)
    x, mask = random_batch(n=24, d_model=32, valid=(10, 7))
    torch.testing.assert_close(module(x, mask), exact(module, x, mask), rtol=1e-5, atol=1e-5)
    assert calls, "length 24 > 12 clusters must take the clustering path, not the exact fallback"


def test_fewer_valid_tokens_than_clusters():
    module = make(num_clusters=8)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 3))
    y = module(x, mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()
    torch.testing.assert_close(y[1], exact(module, x, mask)[1], rtol=1e-5, atol=1e-5)


def test_short_sequences_fall_back_to_exact_attention(monkeypatch):
    monkeypatch.setattr(clustered_module, "hamming_kmeans", refuse_to_cluster)
    module = make(num_clusters=8)
    x, mask = random_batch(n=8, d_model=32, valid=(8, 5))
    torch.testing.assert_close(module(x, mask), exact(module, x, mask), rtol=1e-5, atol=1e-5)


def test_equals_a_slow_per_query_reference():
    module = make(num_clusters=4)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 19))
    q, k, v = module.project(x)
    assignment = module.cluster(q, mask)
    expected = torch.zeros_like(q)
    for b, h, i in torch.nonzero(mask[:, None, :].expand(q.shape[:3])).tolist():
        members = (assignment[b, h] == assignment[b, h, i]) & mask[b]
        centroid = q[b, h, members].mean(0)
        scores = (k[b, h] @ centroid / math.sqrt(q.shape[-1])).masked_fill(~mask[b], float("-inf"))
        expected[b, h, i] = torch.softmax(scores, 0) @ v[b, h]
    assert assignment.unique().numel() > 2, "the test needs a real clustering"
    torch.testing.assert_close(module(x, mask), module.output(expected, mask), rtol=1e-5, atol=1e-5)


def test_padded_tokens_never_change_real_outputs_on_the_clustering_path():
    module = make(num_clusters=4)
    x, mask = random_batch(n=32, d_model=32, valid=(27, 9))
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    y = module(x, mask)
    assert torch.equal(y[mask], module(noisy, mask)[mask])
    assert (y[~mask] == 0).all()


def test_eval_is_deterministic_and_training_draws_fresh_planes():
    module = make(num_clusters=4)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 20))
    assert torch.equal(module(x, mask), module(x, mask))
    twin = make(seed=5, num_clusters=4)
    twin.load_state_dict(module.state_dict())
    assert torch.equal(module(x, mask), twin(x, mask)), "same weights and hash_seed, same eval output"
    q = module.project(x)[0]
    module.train()
    torch.manual_seed(0)
    assert not torch.equal(module.cluster(q, mask), module.cluster(q, mask))


def test_gradient_reaches_member_queries_but_not_through_the_clustering():
    module = make(num_clusters=4)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 12))
    q, k, v = (t.detach().requires_grad_(True) for t in module.project(x))
    assert not module.cluster(q, mask).requires_grad
    module.attend(q, k, v, mask).sum().backward()
    valid = mask[:, None, :].expand(q.shape[:3])
    assert (q.grad[valid].abs().sum(-1) > 0).all(), "every member query moves its centroid"
    assert (q.grad[~valid] == 0).all(), "padded queries belong to no centroid"


def test_bf16_autocast_is_finite():
    assert_bf16_finite(make(num_clusters=4).train(), n=32, valid=(32, 1))


def test_never_builds_an_n_by_n_tensor():
    n = 256
    assert largest_tensor(VanillaAttention(8, 2, impl="math"), n=n) >= n * n, "the probe must see N x N"
    assert largest_tensor(ClusteredAttention(8, 2, num_clusters=8), n=n) < n * n


def test_trains_with_adam():
    first, last = fit_briefly(lambda: ClusteredAttention(32, 4, dropout=0.1, num_clusters=4))
    assert last < 0.5 * first


@pytest.mark.parametrize("field", ["num_clusters", "bits", "iterations"])
def test_bad_options_are_refused_with_the_file_to_fix(field):
    with pytest.raises(ValueError, match=rf"{field}=0.*configs/attention/clustered.yaml"):
        ClusteredAttention(32, 4, **{field: 0})
