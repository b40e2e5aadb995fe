"""Improved clustered attention: exact when top-k covers the keys, per-slot masks, reference."""

from __future__ import annotations

import math

import pytest
import torch

from cast.attention import clustered as clustered_module
from cast.attention.base import key_padding_bias
from cast.attention.cluster_blocks import block_attention, block_layout, block_size
from cast.attention.clustered import ClusteredAttention, per_query
from cast.attention.iclustered import ImprovedClusteredAttention, _TopKeys
from tests.attention.reference import assert_bf16_finite, exact, fit_briefly, largest_tensor, random_batch
from tests.attention.test_clustered import refuse_to_cluster


def make(seed=0, **options):
    torch.manual_seed(seed)
    return ImprovedClusteredAttention(32, 4, **options).eval()


def random_clustering(num_clusters, seed):
    """A stand-in for module.cluster that ignores the queries: any clustering at all."""

    def cluster(q, mask):
        g = torch.Generator().manual_seed(seed)
        assignment = torch.randint(0, num_clusters, q.shape[:3], generator=g)
        return assignment.masked_fill(~mask[:, None, :], -1)

    return cluster


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_covering_the_valid_keys_is_exact_for_any_clustering(seed):
    # Length 24 > max(num_clusters, topk): the clustering path. Row 1 has 9 valid keys, so 7 of
    # its 16 top slots hold padded keys, which their own slot masks must silence.
    module = make(num_clusters=3, topk=16)
    module.cluster = random_clustering(3, seed)
    x, mask = random_batch(n=24, d_model=32, valid=(16, 9))
    torch.testing.assert_close(module(x, mask), exact(module, x, mask), rtol=1e-5, atol=1e-5)


def test_equals_a_slow_per_query_reference():
    module = make(num_clusters=4, topk=5)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 19))
    q, k, v = module.project(x)
    assignment = module.cluster(q, mask)
    scale = 1 / math.sqrt(q.shape[-1])
    expected = torch.zeros_like(q)
    for b, h, i in torch.nonzero(mask[:, None, :].expand(q.shape[:3])).tolist():
        members = (assignment[b, h] == assignment[b, h, i]) & mask[b]
        centroid = q[b, h, members].mean(0)
        weights = torch.softmax((k[b, h] @ centroid * scale).masked_fill(~mask[b], float("-inf")), 0)
        top = weights.topk(5).indices
        own = torch.softmax(k[b, h, top] @ q[b, h, i] * scale, 0)
        weights_i = weights.clone()
        weights_i[top] = weights[top].sum() * own
        expected[b, h, i] = weights_i @ v[b, h]
    assert assignment.unique().numel() > 2, "the test needs a real clustering"
    torch.testing.assert_close(module(x, mask), module.output(expected, mask), rtol=1e-5, atol=1e-5)


def gathered_per_query(t, top, assignment):
    """Rows of t (B, h, N, d) at the top keys of each query's cluster: (B, h, N, k, d)."""
    own_top = per_query(top, assignment)
    b, h, n, kk = own_top.shape
    return t.gather(2, own_top.reshape(b, h, n * kk, 1).expand(-1, -1, -1, t.shape[-1])).view(b, h, n, kk, -1)


def per_query_gather_mix(self, q, k, v, mask, assignment, centroids):
    """The former form: every query gathers its cluster's top-k keys and values, (B, h, N, k, d)."""
    scale = 1 / math.sqrt(q.shape[-1])
    weights = torch.softmax(centroids @ k.transpose(-1, -2) * scale + key_padding_bias(mask, q.dtype), -1)
    top = weights.topk(self.topk, dim=-1).indices
    top_valid = mask[:, None, None, :].expand_as(weights).gather(-1, top)
    top_mass = (weights.gather(-1, top) * top_valid).sum(-1, keepdim=True)
    rest = weights.scatter(-1, top, 0.0) @ v
    keys, values = (gathered_per_query(t, top, assignment) for t in (k, v))
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, keys) * scale
    scores = scores.masked_fill(~per_query(top_valid, assignment), torch.finfo(q.dtype).min)
    exact = torch.softmax(scores, dim=-1) * per_query(top_mass, assignment)
    return per_query(rest, assignment) + torch.einsum("bhnk,bhnkd->bhnd", exact, values)


def values_and_gradients(module, x, mask):
    x = x.clone().requires_grad_(True)
    y = module(x, mask)
    grads = torch.autograd.grad(y.square().sum(), [x, *module.parameters()])
    return y, grads


@pytest.mark.parametrize("clustering", ["kmeans", "random"])
@pytest.mark.parametrize(
    "n,clusters,topk,valid", [(64, 4, 8, (64, 30)), (200, 8, 16, (150, 200)), (96, 6, 40, (96, 20))]
)
def test_shared_blocks_equal_the_per_query_gather(monkeypatch, clustering, n, clusters, topk, valid):
    module = make(num_clusters=clusters, topk=topk)
    if clustering == "random":
        module.cluster = random_clustering(clusters, seed=n)
    x, mask = random_batch(n=n, d_model=32, valid=valid)
    y, grads = values_and_gradients(module, x, mask)
    monkeypatch.setattr(ImprovedClusteredAttention, "mix", per_query_gather_mix)
    expected_y, expected_grads = values_and_gradients(module, x, mask)
    torch.testing.assert_close(y, expected_y, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,clusters", [(40, 3), (300, 5), (1000, 4)])
def test_block_layout_puts_each_query_in_a_block_of_its_own_cluster(length, clusters):
    g = torch.Generator().manual_seed(length)
    assignment = torch.randint(-1, clusters, (2, 3, length), generator=g)
    layout = block_layout(assignment, clusters, block_size(length, clusters))
    slot = layout.slot
    assert all(row.unique().numel() == length for row in slot.view(-1, length)), "one slot per query"
    assert torch.equal(layout.query.gather(2, slot), torch.arange(length).expand_as(slot))
    owner = layout.block_cluster.gather(2, slot // layout.block)
    assert torch.equal(owner, assignment.clamp(min=0))
    sizes = torch.stack([(assignment.clamp(min=0) == c).sum(-1) for c in range(clusters)], -1)
    needed = ((sizes + layout.block - 1) // layout.block).sum(-1).max()
    assert layout.blocks == needed, "no more blocks than the fullest (batch, head) needs"


def per_query_block_attention(q, k, values, rest, top, bias, assignment, scale, dropout):
    """block_attention by plain autograd, one (N, k, d) gather per query; the dropout mask is
    drawn as block_attention draws it (per block slot), so the same seed gives the same mask."""
    cluster = assignment.clamp(min=0)
    keys = gathered_per_query(k, top, cluster)
    b, h, n, kk = keys.shape[:4]
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, keys) * scale
    if bias is not None:
        scores = scores + per_query(bias, cluster)
    return torch.softmax(scores, -1), lambda weights: per_query(rest, cluster) + torch.einsum(
        "bhnk,bhnkd->bhnd", weights, per_query(values.flatten(3), cluster).view(b, h, n, kk, -1))


@pytest.mark.parametrize("heads_from_projection", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_block_attention_gradients_equal_plain_autograd(heads_from_projection, dropout):
    g = torch.Generator().manual_seed(5)
    b, h, n, d, clusters, kk = 2, 3, 70, 8, 4, 6
    if heads_from_projection:   # (B, h, N, d) as a transposed view of (B, N, h·d), as project() gives
        q, k = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        q, k = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    values = torch.randn(b, h, clusters, kk, d, generator=g)
    rest = torch.randn(b, h, clusters, d, generator=g)
    top = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b * h * clusters)]).view(b, h, clusters, kk)
    bias = torch.zeros(b, h, clusters, kk).masked_fill_(torch.rand(b, h, clusters, kk, generator=g) < 0.2, -1e30)
    assignment = torch.randint(0, clusters, (b, h, n), generator=g)
    layout = block_layout(assignment, clusters, 8)
    inputs = [t.requires_grad_() for t in (q, k, values, rest)]
    out_grad = torch.randn(b, h, n, d, generator=g)

    torch.manual_seed(0)
    y = block_attention(*inputs, top, bias, layout, 0.3, dropout)
    grads = torch.autograd.grad((y * out_grad).sum(), inputs)

    weights, mix = per_query_block_attention(*inputs, top, bias, assignment, 0.3, dropout)
    if dropout:  # the same mask: drawn over the block slots, read back at each query's slot
        torch.manual_seed(0)
        kept_slots = torch.rand(layout.blocks * layout.block * b * h, kk) >= dropout
        kept = kept_slots.view(b, h, -1, kk).gather(2, layout.slot.unsqueeze(-1).expand(-1, -1, -1, kk))
        weights = weights * kept / (1 - dropout)
    expected = mix(weights)
    expected_grads = torch.autograd.grad((expected * out_grad).sum(), inputs)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def top_keys_by_autograd(centroids, k, v, mask, topk, scale, dropout):
    """_TopKeys by plain autograd: what its one backward node must equal."""
    bias = key_padding_bias(mask if mask is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool),
                            k.dtype)
    weights = torch.softmax((centroids * scale) @ k.transpose(-1, -2) + bias, dim=-1)
    top_weights, top = weights.topk(topk, dim=-1, sorted=False)
    top_valid = None if mask is None else mask[:, None, None, :].expand_as(weights).gather(-1, top)
    top_mass = (top_weights if mask is None else top_weights * top_valid).sum(-1, keepdim=True)
    dropped = torch.nn.functional.dropout(weights, dropout) if dropout else weights
    top_values = torch.stack([v[b, h, top[b, h]] for b in range(v.shape[0]) for h in range(v.shape[1])])
    top_values = top_values.view(*top.shape, -1)
    rest = dropped.scatter(-1, top, 0.0) @ v
    return rest, top_values * top_mass.unsqueeze(-1), top, top_valid


@pytest.mark.parametrize("heads_from_projection", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("padded", [False, True])
def test_top_keys_node_equals_plain_autograd(heads_from_projection, dropout, padded):
    g = torch.Generator().manual_seed(7)
    b, h, n, d, clusters, kk = 2, 3, 50, 8, 4, 6
    if heads_from_projection:
        k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    centroids = torch.randn(b, h, clusters, d, generator=g)
    mask = (torch.arange(n) < torch.tensor([n, 4])[:, None]) if padded else None  # row 1: 4 < topk valid keys
    inputs = [t.requires_grad_() for t in (centroids, k, v)]
    grad_rest, grad_values = torch.randn(b, h, clusters, d, generator=g), torch.randn(b, h, clusters, kk, d, generator=g)
    results = []
    for form in (_TopKeys.apply, top_keys_by_autograd):
        torch.manual_seed(0)
        rest, values, top, top_valid = form(*inputs, mask, kk, 0.3, dropout)
        loss = (rest * grad_rest).sum() + (values * grad_values).sum()
        results.append((rest, values, top, top_valid, torch.autograd.grad(loss, inputs)))
    (rest, values, top, valid, grads), (rest_, values_, top_, valid_, grads_) = results
    assert torch.equal(top, top_) and (valid is None) == (not padded)
    if padded:
        assert torch.equal(valid, valid_) and not valid.all(), "some top slots must hold padded keys"
    torch.testing.assert_close(rest, rest_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, values_, rtol=1e-5, atol=1e-5)
    for grad, want in zip(grads, grads_):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_more_accurate_than_plain_clustering_with_the_same_clusters():
    improved = make(num_clusters=4, topk=8)
    plain = ClusteredAttention(32, 4, num_clusters=4).eval()
    plain.load_state_dict(improved.state_dict())
    x, mask = random_batch(n=48, d_model=32, valid=(48, 30))
    reference = exact(improved, x, mask)
    assert (improved(x, mask) - reference).norm() < (plain(x, mask) - reference).norm()


def test_short_sequences_fall_back_to_exact_attention(monkeypatch):
    monkeypatch.setattr(clustered_module, "hamming_kmeans", refuse_to_cluster)
    module = make(num_clusters=4, topk=16)
    x, mask = random_batch(n=16, d_model=32, valid=(16, 5))
    torch.testing.assert_close(module(x, mask), exact(module, x, mask), rtol=1e-5, atol=1e-5)


def test_padded_tokens_never_change_real_outputs_on_the_clustering_path():
    module = make(num_clusters=4, topk=12)
    x, mask = random_batch(n=32, d_model=32, valid=(27, 9))
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    y = module(x, mask)
    torch.testing.assert_close(y[mask], module(noisy, mask)[mask], rtol=1e-5, atol=1e-6)
    assert (y[~mask] == 0).all()


def test_eval_is_deterministic():
    module = make(num_clusters=4, topk=6)
    x, mask = random_batch(n=32, d_model=32, valid=(32, 20))
    assert torch.equal(module(x, mask), module(x, mask))


def test_bf16_autocast_and_gradients_are_finite():
    assert_bf16_finite(make(num_clusters=4, topk=6).train(), n=32, valid=(32, 1))


def test_never_builds_an_n_by_n_tensor():
    n = 256
    assert largest_tensor(ImprovedClusteredAttention(8, 2, num_clusters=8, topk=8), n=n) < n * n


def test_never_gathers_the_top_keys_once_per_query():
    n, heads, d, k = 1024, 2, 16, 32
    per_query_keys = heads * n * k * d
    module = ImprovedClusteredAttention(heads * d, heads, num_clusters=8, topk=k)
    assert largest_tensor(module, n=n) < per_query_keys / 4


def test_trains_with_adam():
    first, last = fit_briefly(lambda: ImprovedClusteredAttention(32, 4, dropout=0.1, num_clusters=4, topk=6))
    assert last < 0.5 * first


def test_bad_topk_is_refused_with_the_file_to_fix():
    with pytest.raises(ValueError, match=r"topk=0.*configs/attention/iclustered.yaml"):
        ImprovedClusteredAttention(32, 4, topk=0)
