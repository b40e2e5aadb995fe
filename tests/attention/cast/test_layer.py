"""CAST attention: its limits, padding, equivariance, gradients, combination, memory and options."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from omegaconf import OmegaConf

import cast.attention.cast.combine as cast_combine
from cast.attention.cast.layer import CASTAttention, combine, gated_mix, gather_tokens, token_rows
from cast.attention.cast.clustering import Clusters
from cast.app.paths import CONFIG_DIR
from tests.attention.reference import LargestTensor, random_batch, softmax_attention

D_MODEL, HEADS = 32, 4
CONFIG = CONFIG_DIR / "attention" / "cast.yaml"
MODES = [
    {},
    {"clustering": "sa_topk"},
    {"attn_fn": "laplace"},
    {"summaries": "all"},
    {"summaries": "none"},
    {"combine_with": "query"},
    {"shared_heads": True},
    {"shared_heads": True, "clustering": "sa_topk", "summaries": "all", "combine_with": "query"},
    {"cluster_size": 3},
]


def mode_id(mode: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mode.items()) or "defaults"


def make(**options) -> CASTAttention:
    torch.manual_seed(0)
    return CASTAttention(D_MODEL, HEADS, **{"num_clusters": 4, **options}).eval()


def holey_batch(b=2, n=24, seed=0):
    """x and a mask with padding scattered anywhere (not only at the end)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D_MODEL, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.35
    mask[:, 3] = True
    return x, mask


@pytest.mark.parametrize("option,bad", [
    ("num_clusters", 0), ("num_clusters", 2.5), ("cluster_size", "big"), ("cluster_size", 0),
    ("clustering", "kmeans"), ("attn_fn", "relu"), ("summaries", "some"), ("combine_with", "key"),
    ("shared_heads", "yes"), ("shared_heads", 1),
])
def test_bad_options_are_refused_by_name(option, bad):
    with pytest.raises(ValueError, match=f"{option}=.*cast.yaml"):
        CASTAttention(D_MODEL, HEADS, **{option: bad})


def test_auto_cluster_size_covers_the_sequence_and_sizes_never_exceed_it():
    assert make(num_clusters=5).size_for(24) == 5
    assert make(num_clusters=30).size_for(24) == 1
    assert make(cluster_size=40).size_for(24) == 24


@pytest.mark.parametrize("mode", [
    {}, {"clustering": "sa_topk"}, {"summaries": "all"}, {"combine_with": "query"},
    {"shared_heads": True}, {"qkv_dim": 16},
], ids=mode_id)
def test_one_cluster_holding_everything_is_exact_softmax_attention(mode):
    module = make(num_clusters=1, **mode)
    x, mask = random_batch(n=20, d_model=D_MODEL, valid=(20, 7))
    q, k, v = module.project(x)
    expected = module.output(softmax_attention(q, k, v, mask), mask)
    torch.testing.assert_close(module(x, mask), expected, rtol=1e-5, atol=1e-5)


def test_laplace_attention_follows_its_formula():
    module = make(num_clusters=1, attn_fn="laplace")
    x, mask = random_batch(n=12, d_model=D_MODEL, valid=(12, 5))
    q, k, v = module.project(x)
    s = q @ k.transpose(-1, -2) / 12  # κ = N with one cluster
    mu, sigma = math.sqrt(0.5), math.sqrt(1 / (4 * math.pi))
    f = 0.5 * (1 + torch.erf((s - mu) / (sigma * math.sqrt(2))))
    expected = module.output((f * mask[:, None, None, :]) @ v, mask)
    torch.testing.assert_close(module(x, mask), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_padding_comes_out_zero_and_never_reaches_real_tokens(mode):
    module = make(**mode)
    x, mask = holey_batch()
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    noisy.requires_grad_(True)
    y, y_noisy = module(x, mask), module(noisy, mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], y_noisy[mask], rtol=1e-5, atol=1e-6)
    y_noisy.square().sum().backward()
    assert (noisy.grad[~mask] == 0).all(), "padded tokens must not receive gradient"


@pytest.mark.parametrize(
    "mode", [{}, {"clustering": "sa_topk"}, {"shared_heads": True, "summaries": "all"}], ids=mode_id
)
def test_permuting_the_sequence_permutes_the_output(mode):
    module = make(**mode)
    x, mask = holey_batch(seed=1)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(module(x[:, perm], mask[:, perm]), module(x, mask)[:, perm],
                               rtol=1e-5, atol=1e-6)


def test_two_stage_top_k_keeps_padding_out_and_permutes_with_the_sequence():
    """At n = 256 with κ = 8 the clustering takes the two-stage top-k (top_indices)."""
    module = make(cluster_size=8)
    x, mask = holey_batch(n=256, seed=3)
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    y = module(x, mask)
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], module(noisy, mask)[mask], rtol=1e-5, atol=1e-6)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(module(x[:, perm], mask[:, perm]), y[:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clustering", ["topk", "sa_topk"])
def test_summaries_from_the_attention_call_equal_their_own_formula(clustering, monkeypatch):
    """The surrogate as one more query row in each cluster's SDPA call (the default path) gives
    R_c = Σ_j softmax_j(A_k[j, c]) v_j, padding and an empty cluster included, and the same
    gradients as computing it apart (summarise)."""
    fused = make(clustering=clustering, num_clusters=6, cluster_size=3)
    assert fused.summaries_in_attention()
    apart = make(clustering=clustering, num_clusters=6, cluster_size=3)
    monkeypatch.setattr(apart, "summaries_in_attention", lambda: False)
    x, mask = holey_batch(n=12, seed=5)
    mask[1, 5:] = False  # row 1: 6 clusters of 3 slots and few real tokens, so sa_topk leaves some empty
    outputs, grads = [], []
    for module in (fused, apart):
        xi = x.clone().requires_grad_(True)
        y = module(xi, mask)
        y.square().sum().backward()
        outputs.append(y)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for g_fused, g_apart in zip(*grads):
        torch.testing.assert_close(g_fused, g_apart, rtol=1e-4, atol=1e-6)


# Which parameters learn. With combine_with=query the gate only steers the (gradient-free)
# clustering, so it gets no gradient at all; the key bias then only shifts every softmax score of
# a query (inside clusters and in the summaries) by the same amount, so its gradient is zero up
# to rounding unless attn_fn=laplace, which is not shift-invariant.
@pytest.mark.parametrize("combine_with", ["affinity", "query"])
@pytest.mark.parametrize("mode", [
    {}, {"clustering": "sa_topk"}, {"attn_fn": "laplace"}, {"summaries": "all"}, {"summaries": "none"},
    {"shared_heads": True},
], ids=mode_id)
def test_gradients_reach_exactly_the_parameters_that_learn(mode, combine_with):
    module = make(combine_with=combine_with, **mode).train()
    x, mask = random_batch(n=24, d_model=D_MODEL, valid=(24, 13))
    module(x, mask).square().sum().backward()
    silent = {"gate.weight", "gate.bias"} if combine_with == "query" else set()
    shift_invariant = combine_with == "query" and mode.get("attn_fn") != "laplace"
    for name, p in module.named_parameters():
        if name in silent:
            assert p.grad is None, name
            continue
        assert torch.isfinite(p.grad).all(), name
        if name == "k_proj.bias" and shift_invariant:
            assert p.grad.abs().max() < 1e-5, name
        else:
            assert p.grad.abs().max() > 1e-5, f"{name} receives no gradient"


def loop_combine(logits, summaries, intra, index, valid):
    """Slow, literal O_i = Σ_c W[i, c] · (own intra output in c if a member, else R_c)."""
    b, h, nc, k, d = intra.shape
    weights = torch.softmax(logits, dim=-2)
    out = torch.zeros(b, h, logits.shape[-1], d, dtype=intra.dtype)
    for bi in range(b):
        for hi in range(h):
            hw = hi if weights.shape[1] == h else 0
            for i in range(logits.shape[-1]):
                for c in range(nc):
                    own = [s for s in range(k) if valid[bi, hi, c, s] and index[bi, hi, c, s] == i]
                    if own:
                        term = intra[bi, hi, c, own[0]]
                    elif summaries is None:
                        continue
                    else:
                        term = summaries[bi, hi, c]
                    out[bi, hi, i] += weights[bi, hw, c, i] * term
    return out


def combination_inputs(style, shared, b=2, h=3, nc=4, k=3, n=14, d=5, dtype=torch.float):
    """q, k (B, N, h', d'), gates (B, N, h'), scaled surrogates (h', Nc, d'), summaries, intra and
    clusters (B, h', Nc, κ), with h' = 1 and d' = h·d for shared heads."""
    gen = torch.Generator().manual_seed(0)
    hw, width = (1, h * d) if shared else (h, d)
    q, key = (torch.randn(b, n, hw, width, generator=gen, dtype=dtype) for _ in range(2))
    gates = torch.rand(b, n, hw, generator=gen, dtype=dtype)
    s = torch.randn(hw, nc, width, generator=gen, dtype=dtype)
    if style == "topk":  # distinct tokens per cluster, a token in several clusters or none
        index = torch.rand(b, hw, nc, n, generator=gen).argsort(-1)[..., :k]
    else:  # single assignment: disjoint clusters
        index = torch.rand(b, hw, n, generator=gen).argsort(-1)[..., : nc * k].view(b, hw, nc, k)
    valid = torch.rand(b, hw, nc, k, generator=gen) > 0.25
    summaries = torch.randn(b, h, nc, d, generator=gen, dtype=dtype)
    intra = torch.randn(b, h, nc, k, d, generator=gen, dtype=dtype)
    return q, key, gates, s, summaries, intra, Clusters(index, valid)


def reference_logits(q, k, gates, s):
    """The gated affinities A_g = g·A_q + (1 − g)·A_k, cluster-major (B, h', Nc, N)."""
    a_q, a_k = (torch.einsum("bngw,gcw->bgcn", t, s) for t in (q, k))
    if k is None:
        return a_q
    g = gates.permute(0, 2, 1).unsqueeze(2)
    return g * a_q + (1 - g) * a_k


@pytest.mark.parametrize("style", ["topk", "sa_topk"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_summaries", [True, False])
@pytest.mark.parametrize("query_only", [False, True])
def test_vectorised_combination_equals_the_per_token_loop(style, shared, with_summaries, query_only,
                                                          monkeypatch):
    monkeypatch.setattr(cast_combine, "CHUNK_ELEMENTS", 1)  # one batch row per pass: chunks must agree
    q, k, gates, s, summaries, intra, clusters = combination_inputs(style, shared)
    summaries = summaries if with_summaries else None
    if query_only:
        k = gates = None
        logits, mix = torch.einsum("bngw,gcw->bgcn", q, s), q
    else:
        logits, mix = reference_logits(q, k, gates, s), gated_mix(q, k, gates)
    h = intra.shape[1]
    index, valid = (t.expand(-1, h, -1, -1) for t in clusters)
    expected = loop_combine(logits, summaries, intra, index, valid)
    got = combine(summaries, intra, clusters, s, mix)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("style", ["topk", "sa_topk"])
@pytest.mark.parametrize("chunk", [1, 2**20])
def test_combination_backward_matches_finite_differences(style, shared, chunk, monkeypatch):
    monkeypatch.setattr(cast_combine, "CHUNK_ELEMENTS", chunk)
    *tensors, clusters = combination_inputs(style, shared, b=2, h=2, nc=3, k=2, n=7, d=2,
                                            dtype=torch.double)
    tensors = tuple(t.requires_grad_(True) for t in tensors)
    assert torch.autograd.gradcheck(
        lambda q, k, g, s, r, i: combine(r, i, clusters, s, gated_mix(q, k, g)), tensors)
    q, _, _, s, r, i = tensors
    assert torch.autograd.gradcheck(lambda q, s, r, i: combine(r, i, clusters, s, q), (q, s, r, i))


def test_token_rows_address_the_projection_layout():
    t = torch.randn(2, 5, 3, 4)  # (B, N, h, d)
    index = torch.tensor([4, 0, 2]).expand(2, 3, 1, 3)
    expected = t.transpose(1, 2)[:, :, [4, 0, 2]].reshape(-1, 4)
    assert torch.equal(t.reshape(-1, 4)[token_rows(index, 5).flatten()], expected)


@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_a_cluster_without_real_tokens_is_finite_and_never_read(attn_fn):
    module = make(attn_fn=attn_fn)
    qc, kc, vc = (torch.randn(1, 2, 3, 4, 8) for _ in range(3))
    valid = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4]).expand(1, 2, 3, 4)
    out = module.attend_clusters(qc, kc, vc, valid)
    assert torch.isfinite(out).all() and (out[:, :, 2] != 0).any()
    # What the invalid slots hold, the empty cluster's among them, never reaches the output.
    q, s, summaries = torch.randn(1, 9, 2, 8), torch.randn(2, 3, 8), torch.randn(1, 2, 3, 8)
    clusters = Clusters(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 2, 4]]).expand(1, 2, 3, 4), valid)
    garbage = out.masked_fill(~valid.unsqueeze(-1), 1e6)
    zeros = out.masked_fill(~valid.unsqueeze(-1), 0.0)
    torch.testing.assert_close(combine(summaries, garbage, clusters, s, q),
                               combine(summaries, zeros, clusters, s, q))


def test_single_real_token_with_single_assignment_leaves_clusters_empty_without_nan():
    module = make(clustering="sa_topk").train()
    module.record = True
    x, mask = random_batch(n=16, d_model=D_MODEL, valid=(16, 1))
    x.requires_grad_(True)
    y = module(x, mask)
    assert (module.last_clusters.valid[1].sum(-1) == 0).any()
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("clustering", ["topk", "sa_topk"])
def test_memory_at_4096_tokens_stays_far_below_one_n_by_n_tensor(clustering):
    n = 4096
    torch.manual_seed(0)
    module = CASTAttention(16, 2, num_clusters=64, clustering=clustering)
    x, mask = torch.randn(1, n, 16, requires_grad=True), torch.ones(1, n, dtype=torch.bool)
    mask[0, -100:] = False
    with LargestTensor() as largest:
        module(x, mask).sum().backward()
    assert largest.numel <= 2 * 64 * n  # heads × clusters × tokens: the affinity matrix
    assert largest.numel < n * n // 8


def test_bfloat16_autocast_runs_and_stays_close():
    module = make()
    x, mask = random_batch(n=24, d_model=D_MODEL, valid=(24, 13))
    x.requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = module(x, mask)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and (y[~mask] == 0).all() and torch.isfinite(x.grad).all()
    reference = module(x, mask)
    assert (y.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("n,size", [(16, "auto"), (256, 8)])  # torch's top-k; the two-stage one
def test_compiles_as_one_graph_and_matches_eager(n, size):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    module = make(cluster_size=size)
    x, mask = random_batch(n=n, d_model=D_MODEL, valid=(n, n // 2 + 1))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [compiled(xs[0], mask), module(xs[1], mask)]
    for y in ys:
        y.square().sum().backward()
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(xs[0].grad, xs[1].grad)


def test_shared_heads_use_one_clustering_one_gate_and_one_set_of_surrogates():
    module = make(shared_heads=True)
    module.record = True
    x, mask = holey_batch()
    assert module.gate.out_features == 1 and module.surrogates.shape == (4, D_MODEL)
    module(x, mask)
    index, valid = module.last_clusters
    assert (index == index[:, :1]).all() and (valid == valid[:, :1]).all()
    assert (module.last_gates == module.last_gates[:, :1]).all()


def test_recording_keeps_the_last_clusters_and_gates_on_the_cpu():
    module = make()
    x, mask = holey_batch()
    module(x, mask)
    assert module.last_clusters is None and module.last_gates is None
    module.record = True
    module(x, mask)
    index, valid = module.last_clusters
    assert index.shape == valid.shape == (2, HEADS, 4, 6)
    assert module.last_gates.shape == (2, HEADS, 24)
    assert index.device.type == "cpu" and not module.last_gates.requires_grad
    assert ((module.last_gates > 0) & (module.last_gates < 1)).all()
    for row in range(2):
        assert mask[row][index[row][valid[row]]].all(), "a valid slot must hold a real token"


def test_config_lists_every_option_with_its_default_and_takes_num_clusters_from_the_task():
    cfg = OmegaConf.load(CONFIG)
    defaults = {
        name: p.default for name, p in inspect.signature(CASTAttention).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "dropout"
    }
    assert {k for k in cfg if not k.startswith("_")} == set(defaults)
    resolved = OmegaConf.to_container(OmegaConf.merge({"attention": cfg}).attention, resolve=True)
    assert {k: resolved[k] for k in defaults} == defaults
    per_task = OmegaConf.merge({"num_clusters": 8}, {"attention": cfg})
    assert per_task.attention.num_clusters == 8
    per_task.merge_with(OmegaConf.from_dotlist(["attention.num_clusters=64"]))
    assert per_task.attention.num_clusters == 64


@pytest.mark.parametrize("layout", ["cluster-major", "slot-major"])
def test_gathered_members_scatter_their_gradient_back_from_either_layout(layout):
    """SDPA's CPU backward returns (B, h, κ, Nc, d)-major gradients; both layouts must land on the
    rows they were gathered from, a token picked twice receiving both shares."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 7, 3, 4, generator=gen, dtype=torch.double, requires_grad=True)  # (B, N, h, d)
    index = torch.randint(0, 7, (2, 3, 5, 2), generator=gen)  # (B, h, Nc, κ), repeats included
    grad = torch.randn(2, 3, 5, 2, 4, generator=gen, dtype=torch.double)
    if layout == "slot-major":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
        assert not grad.is_contiguous()
    gather_tokens(t, index).backward(grad)
    reference = t.detach().clone().requires_grad_(True)
    heads = torch.arange(3).view(1, 3, 1, 1)
    batch = torch.arange(2).view(2, 1, 1, 1)
    reference[batch, index, heads].backward(grad)
    torch.testing.assert_close(t.grad, reference.grad)
