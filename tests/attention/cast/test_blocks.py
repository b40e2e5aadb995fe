"""CAST's attention inside the clusters (cast/attention/cast_blocks.py): the chunked CPU path
against torch's SDPA, its backward pass with and without dropout, and blocks without members."""

import pytest
import torch
import torch.nn.functional as F

import cast.attention.cast.blocks as blocks
from cast.attention.cast.blocks import _BlockAttention, block_attention


def inputs(p=2, c=4, queries=5, size=4, d=3, dtype=torch.float32, seed=0):
    """Blocks as CAST passes them: (P, C, ·, d) for P = B·h and C = Nc, valid (P, C, κ)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(p, c, n, d, generator=gen, dtype=dtype) for n in (queries, size, size))
    valid = torch.rand(p, c, size, generator=gen) > 0.3
    valid[0, 0] = False  # a block without a real member
    valid[0, 1] = True
    return q, k, v, valid


def sdpa_reference(q, k, v, valid):
    keys = valid | ~valid.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys.unsqueeze(-2))


@pytest.mark.parametrize("queries", [4, 5])  # κ members, or κ + 1 with the summary row
@pytest.mark.parametrize("chunk,small", [(1, 64), (2**18, 64), (1, 0)])  # chunked path; SDPA's (small=0)
def test_both_paths_equal_sdpa_with_padding_and_an_empty_block(queries, chunk, small, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(blocks, "SMALL_BLOCK", small)
    q, k, v, valid = inputs(queries=queries)
    results = []
    for fn in (block_attention, None):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, valid, 0.0) if fn else sdpa_reference(*leaves, valid)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    assert torch.isfinite(results[0][0]).all()
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_passes_gradcheck_with_its_redrawn_dropout_masks(p, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_CHUNK_ELEMENTS", 40)  # several chunks, each with its masks
    q, k, v, valid = (t.flatten(0, 1) for t in inputs(dtype=torch.float64))  # the path's (G, ·, d)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: _BlockAttention.apply(*t, valid, p, 1234), leaves)


def test_dropout_follows_the_global_seed_and_keeps_the_mean():
    q, k, v, valid = inputs(p=1, c=2, queries=4, size=6, d=2)
    torch.manual_seed(0)
    first = block_attention(q, k, v, valid, 0.5)
    torch.manual_seed(0)
    assert torch.equal(first, block_attention(q, k, v, valid, 0.5))
    assert not torch.equal(first, block_attention(q, k, v, valid, 0.5))
    mean = torch.stack([block_attention(q, k, v, valid, 0.5) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, block_attention(q, k, v, valid, 0.0), rtol=0.1, atol=0.05)
