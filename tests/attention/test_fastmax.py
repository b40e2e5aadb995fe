"""Fastmax: the factorised form equals explicit N x N polynomial attention; padding; dropout."""

from __future__ import annotations

import pytest
import torch

from cast.attention.fastmax import FastmaxAttention, normalise
from tests.attention.reference import assert_bf16_finite, fit_briefly, largest_tensor, random_batch


def polynomial_attention(q, k, v, mask, p):
    """Slow reference: normalise, build the N x N scores, apply f, normalise rows over valid keys."""
    real = mask[:, None, :, None]

    def unit(t):
        t = t - t.mean(-1, keepdim=True)
        return t / t.norm(dim=-1, keepdim=True).masked_fill(~real, 0).amax(2, keepdim=True)

    s = unit(q) @ unit(k).transpose(-1, -2)
    f = 1 + s + (s * s / 2 if p == 2 else 0)
    f = f.masked_fill(~mask[:, None, None, :], 0.0)
    return f / f.sum(-1, keepdim=True) @ v


@pytest.mark.parametrize("p", [1, 2])
def test_factorised_equals_explicit_polynomial_attention(p):
    torch.manual_seed(0)
    module = FastmaxAttention(32, 4, p=p).eval()
    x, mask = random_batch(n=24, d_model=32, valid=(24, 11))
    q, k, v = module.project(x)
    expected = module.output(polynomial_attention(q, k, v, mask, p), mask)
    torch.testing.assert_close(module(x, mask), expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("p", [1, 2])
def test_single_real_token_bf16_autocast_and_gradients_are_finite(p):
    torch.manual_seed(0)
    assert_bf16_finite(FastmaxAttention(32, 4, dropout=0.1, p=p).train(), n=16, valid=(16, 1))


@pytest.mark.parametrize("p", [1, 2])
def test_never_builds_an_n_by_n_tensor(p):
    n = 256
    assert largest_tensor(FastmaxAttention(8, 2, p=p), n=n) < n * n


def test_trains_with_adam():
    first, last = fit_briefly(lambda: FastmaxAttention(32, 4, dropout=0.1))
    assert last < 0.5 * first


def test_bad_order_is_refused_with_the_file_to_fix():
    with pytest.raises(ValueError, match=r"p=3.*configs/attention/fastmax.yaml"):
        FastmaxAttention(32, 4, p=3)
