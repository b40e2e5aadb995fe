"""Fastmax: the chunked factorised form equals explicit N x N polynomial attention for every
option; padding; gradients (gradcheck); dropout; memory."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cast.attention import fastmax_kernel
from cast.attention.fastmax import FastmaxAttention, normalise
from cast.attention.fastmax_kernel import polynomial_attention
from tests.attention.reference import assert_bf16_finite, fit_briefly, largest_tensor, random_batch


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries."""
    monkeypatch.setattr(fastmax_kernel, "CHUNK_ELEMENTS", 64)


def explicit(q, k, v, mask, p, normalize, temperature, coefficients):
    """Slow reference: build the N x N scores, apply f, normalise rows over valid keys."""
    real = mask[:, None, :, None]

    def unit(t):
        t = t - t.mean(-1, keepdim=True)
        return t / t.norm(dim=-1, keepdim=True).masked_fill(~real, 0).amax(2, keepdim=True)

    if normalize:
        s = unit(q) @ unit(k).transpose(-1, -2) / temperature
    else:
        s = q @ k.transpose(-1, -2) / (temperature * math.sqrt(q.shape[-1]))
    a = coefficients or [1 / math.factorial(n) for n in range(p + 1)]
    f = sum(a_n * s**n for n, a_n in enumerate(a))
    f = f.masked_fill(~mask[:, None, None, :], 0.0)
    return f / f.sum(-1, keepdim=True) @ v


OPTIONS = [
    dict(p=p, normalize=normalize, temperature=temperature, coefficients=coefficients)
    for p, normalize, temperature, coefficients in itertools.product(
        [1, 2], [True, False], [1.0, 0.3], [None, "custom"])
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_factorised_equals_explicit_polynomial_attention(options, small_chunks):
    options = dict(options)
    if options["coefficients"] == "custom":
        options["coefficients"] = [2.0, 0.7, 0.3][: options["p"] + 1]
    torch.manual_seed(0)
    module = FastmaxAttention(32, 4, **options).eval()
    x, mask = random_batch(n=24, d_model=32, valid=(24, 11))
    q, k, v = module.project(x)
    expected = module.output(explicit(q, k, v, mask, **options), mask)
    torch.testing.assert_close(module(x, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_padding_neither_changes_real_outputs_nor_receives_gradient(normalize, small_chunks):
    torch.manual_seed(0)
    module = FastmaxAttention(16, 2, normalize=normalize).eval()
    x, mask = random_batch(b=1, n=20, d_model=16, valid=(13,))
    padded = torch.cat([x, torch.randn(1, 9, 16)], 1)
    padded[:, 13:20] = 50 * torch.randn(1, 7, 16)
    padded.requires_grad_(True)
    long_mask = torch.arange(29)[None, :] < 13
    y = module(padded, long_mask)
    torch.testing.assert_close(y[:, :20], module(x, mask), rtol=1e-5, atol=1e-6)
    assert (y[:, 13:] == 0).all()
    y.pow(2).sum().backward()
    assert (padded.grad[:, 13:] == 0).all() and padded.grad[:, :13].abs().sum() > 0


@pytest.mark.parametrize("coefficients", [(1.0, 1.0), (1.0, 1.0, 0.5), (2.0, -0.4, 0.3)])
def test_kernel_gradients_pass_gradcheck_across_chunks(coefficients, small_chunks):
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 2, 13, 3, generator=g, dtype=torch.float64) for _ in range(3))
    keys = (torch.rand(2, 2, 13, 1, generator=g) > 0.3).double()
    u = torch.cat([v, keys], -1)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, u))
    assert torch.autograd.gradcheck(lambda *t: polynomial_attention(*t, coefficients), inputs)


@pytest.mark.parametrize("normalize", [True, False])
def test_module_gradients_pass_gradcheck(normalize, small_chunks):
    torch.manual_seed(0)
    module = FastmaxAttention(8, 2, normalize=normalize, temperature=0.5).double().eval()
    x, mask = random_batch(n=10, d_model=8, valid=(10, 6))
    x = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t, mask), (x,))


def test_normalised_tokens_are_centred_and_the_largest_valid_one_has_unit_norm():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 10, 8, generator=g) * 5
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [4]])
    t[1, :, 4:] *= 100
    u = normalise(t, mask)
    torch.testing.assert_close(u.mean(-1), torch.zeros(2, 3, 10), rtol=0, atol=1e-5)
    norms = u.norm(dim=-1)
    torch.testing.assert_close(norms[mask[:, None, :].expand(2, 3, 10)].view(-1, 1).max(), torch.tensor(1.0))
    torch.testing.assert_close(norms[1, :, :4].amax(-1), torch.ones(3)), "padded tokens set no scale"


def test_dropout_drops_key_columns_and_keeps_the_output_unbiased():
    torch.manual_seed(0)
    module = FastmaxAttention(16, 2, dropout=0.3)
    x, mask = random_batch(b=1, n=12, d_model=16, valid=(9,))
    expected = module.eval()(x, mask)
    module.train()
    draws = module(x.expand(4000, -1, -1), mask.expand(4000, -1))
    assert not torch.allclose(draws[0], draws[1])
    assert (draws[:, ~mask[0]] == 0).all()
    torch.testing.assert_close(draws.mean(0), expected[0], rtol=0, atol=0.02)
    # Dropped keys leave the denominator alone (as dropout on an attention matrix would), so
    # with all values 1 the outputs scatter around 1 instead of being renormalised to it.
    q, k, _ = module.project(x.expand(4000, -1, -1))
    ones = module.attend(q, k, torch.ones_like(q), mask.expand(4000, -1))[:, :, mask[0]]
    assert ones.std() > 0.1
    torch.testing.assert_close(ones.mean(), torch.tensor(1.0), rtol=0, atol=0.01)
    module.dropout = 0.0
    assert torch.equal(module(x, mask), module.eval()(x, mask))


def test_dropout_gradients_match_the_explicit_form_under_the_same_mask():
    torch.manual_seed(0)
    module = FastmaxAttention(16, 2, dropout=0.5, normalize=False, temperature=1.0).train()
    x, mask = random_batch(b=2, n=12, d_model=16, valid=(12, 7))
    x.requires_grad_(True)
    torch.manual_seed(1)
    module(x, mask).pow(2).sum().backward()
    factorised, x.grad = x.grad, None
    torch.manual_seed(1)
    q, k, v = module.project(x)
    keep = torch.nn.functional.dropout(mask[:, None, :, None].float().expand(*v.shape[:3], 1), 0.5)
    weights = explicit(q, k, torch.eye(12).expand(2, 2, 12, 12), mask, 2, False, 1.0, None)
    module.output(weights @ (v * keep), mask).pow(2).sum().backward()
    torch.testing.assert_close(factorised, x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_single_real_token_bf16_autocast_and_gradients_are_finite(p, normalize):
    torch.manual_seed(0)
    assert_bf16_finite(FastmaxAttention(32, 4, dropout=0.1, p=p, normalize=normalize).train(), n=16, valid=(16, 1))


def test_bf16_autocast_agrees_with_float32():
    torch.manual_seed(0)
    module = FastmaxAttention(32, 4).eval()
    x, mask = random_batch(n=24, d_model=32, valid=(24, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x, mask)
    torch.testing.assert_close(low.float(), module(x, mask), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("p", [1, 2])
def test_never_builds_an_n_by_n_tensor(p):
    n = 256
    assert largest_tensor(FastmaxAttention(8, 2, p=p), n=n) < n * n


def test_products_are_built_a_chunk_at_a_time(monkeypatch):
    """No (N, d·(d+1)) tensor of k ⊗ u or q ⊗ q products: with d = 32 the largest tensor of a
    forward and backward pass at N = 1024 is the layer's own activations, far below h·N·d·(d+1)."""
    monkeypatch.setattr(fastmax_kernel, "CHUNK_ELEMENTS", 1 << 14)
    n, heads, d = 1024, 2, 32
    assert largest_tensor(FastmaxAttention(heads * d, heads), n=n) < heads * n * d * (d + 1) // 8


def test_trains_with_adam():
    first, last = fit_briefly(lambda: FastmaxAttention(32, 4, dropout=0.1))
    assert last < 0.5 * first


@pytest.mark.parametrize("option, value", [
    ("p", 3), ("temperature", 0), ("temperature", -1.0), ("coefficients", [1.0, 1.0]),
    ("coefficients", [0.0, 1.0, 0.5]), ("normalize", "yes"),
])
def test_bad_options_are_refused_with_the_file_to_fix(option, value):
    with pytest.raises(ValueError, match=rf"{option}=.*configs/attention/fastmax.yaml"):
        FastmaxAttention(32, 4, **{option: value})
