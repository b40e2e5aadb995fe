"""Vanilla attention: both implementations equal the exact reference, with padding."""

import pytest
import torch

from cast.attention.vanilla import VanillaAttention
from tests.attention.reference import random_batch, softmax_attention


@pytest.mark.parametrize("impl", ["fused", "math"])
def test_equals_exact_reference(impl):
    torch.manual_seed(0)
    module = VanillaAttention(32, 4, impl=impl).eval()
    x, mask = random_batch(n=20, d_model=32, valid=(20, 7))
    q, k, v = module.project(x)
    expected = module.output(softmax_attention(q, k, v, mask), mask)
    torch.testing.assert_close(module(x, mask), expected, rtol=1e-5, atol=1e-5)


def test_fused_and_math_agree_with_narrow_qkv():
    torch.manual_seed(1)
    fused = VanillaAttention(32, 4, impl="fused", qkv_dim=16).eval()
    math_ = VanillaAttention(32, 4, impl="math", qkv_dim=16).eval()
    math_.load_state_dict(fused.state_dict())
    x, mask = random_batch(n=12, d_model=32, valid=(12, 5))
    torch.testing.assert_close(fused(x, mask), math_(x, mask), rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        VanillaAttention(32, 4, impl="flash3")
