"""Reformer LSH attention: exact shared-QK attention when chunks cover the sequence, the same
rounds as a dense reference otherwise, padding carried through the sort, any length, linear
memory, deterministic eval, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from cast.attention.reformer import SELF_SCORE, ReformerAttention
from tests.attention.reference import fit_briefly, largest_tensor, random_batch


def module_and_heads(n, valid, seed=0, **options):
    torch.manual_seed(seed)
    module = ReformerAttention(32, 4, **options).eval()
    x, mask = random_batch(n=n, d_model=32, valid=valid, seed=seed)
    q, k, v = module.project(x)
    assert k is None
    return module, q, v, mask


def shared_qk_exact(q, v, mask):
    """Exact attention with keys = normalised queries; a query skips itself unless it is the
    only real key."""
    keys = F.normalize(q, dim=-1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    alone = mask.sum(-1) == 1
    self_masked = torch.eye(n, dtype=torch.bool) & ~alone[:, None, None, None]
    scores = scores.masked_fill(self_masked, float("-inf"))
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def real_rows(t, mask):
    """Rows of t (B, h, N, d) at real positions, heads folded in."""
    return t.transpose(1, 2)[mask]


@pytest.mark.parametrize("bucket_size", [20, 32])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_chunk_equals_shared_qk_exact_attention(bucket_size, n_hashes):
    module, q, v, mask = module_and_heads(20, (20, 7), bucket_size=bucket_size, n_hashes=n_hashes)
    assert module.bucket_count(math.ceil(20 / bucket_size) * bucket_size) == 1
    expected = shared_qk_exact(q, v, mask)
    torch.testing.assert_close(real_rows(module.attend(q, None, v, mask), mask), real_rows(expected, mask))


def test_two_chunks_see_everything_whatever_the_hashing():
    """Two chunks each look back at the other, so every query sees every key once: exact again,
    through a non-trivial sort and unsort."""
    module, q, v, mask = module_and_heads(24, (24, 19), bucket_size=12, n_hashes=2)
    order = module.buckets(F.normalize(q, dim=-1), mask).sort(dim=-1, stable=True).indices
    assert not torch.equal(order, torch.arange(24).expand_as(order)), "hashing should reorder"
    expected = shared_qk_exact(q, v, mask)
    torch.testing.assert_close(real_rows(module.attend(q, None, v, mask), mask), real_rows(expected, mask))


def dense_rounds_reference(module, q, v, mask):
    """The same LSH attention built densely: per round, which chunk every position lands in,
    an N x N visibility mask (own chunk and the one before, cyclically), softmax with self at
    SELF_SCORE, rounds weighted by softmax of their log-sum-exp."""
    n, c = q.shape[2], module.bucket_size
    n_chunks = n // c
    keys = F.normalize(q, dim=-1)
    buckets = module.buckets(keys, mask)
    rank = (buckets * n + torch.arange(n)).argsort(-1).argsort(-1)
    chunk = rank // c
    same = chunk.unsqueeze(-1) == chunk.unsqueeze(-2)
    before = (chunk.unsqueeze(-1) - 1) % n_chunks == chunk.unsqueeze(-2)
    visible = (same | before) & mask[:, None, None, None, :]
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).unsqueeze(2)
    scores = scores.masked_fill(torch.eye(n, dtype=torch.bool), SELF_SCORE)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)
    rounds = torch.softmax(scores, -1) @ v.unsqueeze(2)
    return (rounds * torch.softmax(lse, 2).unsqueeze(-1)).sum(2)


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_rounds_combine_like_a_dense_reference(n_hashes):
    module, q, v, mask = module_and_heads(32, (32, 21), bucket_size=4, n_hashes=n_hashes)
    expected = dense_rounds_reference(module, q, v, mask)
    torch.testing.assert_close(real_rows(module.attend(q, None, v, mask), mask), real_rows(expected, mask))


def test_hand_written_backward_is_the_gradient():
    """Rounds, padding, the look-back and dropout, in training (rotations and dropout seeded)."""
    torch.manual_seed(0)
    module = ReformerAttention(4, 1, bucket_size=4, n_hashes=2, dropout=0.3).train()
    x, mask = random_batch(n=12, d_model=4, valid=(12, 7))
    q, _, v = module.project(x.double())
    inputs = [t.detach().requires_grad_() for t in (q, v)]

    def attend(q, v):
        torch.manual_seed(0)  # the same rotations and dropout at every evaluation
        return module.attend(q, None, v, mask)

    assert torch.autograd.gradcheck(attend, inputs)


def test_more_rounds_change_the_result():
    one, q, v, mask = module_and_heads(32, (32, 21), bucket_size=4, n_hashes=1)
    three = ReformerAttention(32, 4, bucket_size=4, n_hashes=3).eval()
    assert not torch.allclose(one.attend(q, None, v, mask), three.attend(q, None, v, mask))


def test_a_lone_token_attends_to_itself():
    module, q, v, mask = module_and_heads(16, (16, 1), bucket_size=4)
    torch.testing.assert_close(module.attend(q, None, v, mask)[1, :, 0], v[1, :, 0])


@pytest.mark.parametrize("n, valid", [(5, (5, 2)), (13, (13, 6)), (20, (17, 9))])
def test_any_length_and_padding_never_reaches_real_outputs(n, valid):
    torch.manual_seed(0)
    module = ReformerAttention(32, 4, bucket_size=4, n_hashes=2).eval()
    x, mask = random_batch(n=n, d_model=32, valid=valid)
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    y = module(x, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], module(noisy, mask)[mask], rtol=1e-5, atol=1e-6)


def test_bucket_count_follows_length_and_stays_even():
    module = ReformerAttention(32, 4, bucket_size=8)
    assert [module.bucket_count(8 * chunks) for chunks in (1, 2, 3, 4, 7)] == [1, 2, 4, 4, 8]


def largest_tensor_at(n: int) -> int:
    torch.manual_seed(0)
    return largest_tensor(ReformerAttention(16, 1), n, backward=False)


def test_no_n_by_n_tensor_at_default_settings():
    shorter, longer = largest_tensor_at(1024), largest_tensor_at(2048)
    assert longer <= 2048 * 2048 // 4
    # Linear, not quadratic, in length: doubling N doubles the largest tensor.
    assert longer <= 2.2 * shorter


def test_eval_is_deterministic_and_training_rehashes():
    module, q, v, mask = module_and_heads(32, (32, 21), bucket_size=4)
    twin = ReformerAttention(32, 4, bucket_size=4)
    twin.load_state_dict(module.state_dict())
    reference = module.attend(q, None, v, mask)
    torch.testing.assert_close(module.attend(q, None, v, mask), reference, rtol=0, atol=0)
    torch.testing.assert_close(twin.eval().attend(q, None, v, mask), reference, rtol=0, atol=0)
    module.train()
    first, second = module.attend(q, None, v, mask), module.attend(q, None, v, mask)
    assert not torch.allclose(first, second)


def test_bf16_autocast_is_finite():
    torch.manual_seed(0)
    module = ReformerAttention(32, 4, bucket_size=4).eval()
    x, mask = random_batch(n=20, d_model=32, valid=(20, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x * 30, mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()


def test_trains_with_adam():
    first, last = fit_briefly(lambda: ReformerAttention(32, 4, bucket_size=4, n_hashes=2, dropout=0.1), steps=30)
    assert last < 0.8 * first


@pytest.mark.parametrize("option", [{"bucket_size": 0}, {"n_hashes": 0}, {"n_hashes": 1.5}])
def test_bad_options_are_refused(option):
    with pytest.raises(ValueError, match="reformer.yaml"):
        ReformerAttention(32, 4, **option)
