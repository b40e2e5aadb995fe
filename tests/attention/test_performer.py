"""Performer (FAVOR+): converges to exact softmax attention as features grow, redraws on
schedule, ignores padding, never builds an N x N tensor, stays finite under bf16 autocast and
trains."""

import pytest
import torch

from cast.attention.performer import PerformerAttention, favor, orthogonal_gaussian
from tests.attention.reference import fit_briefly, largest_tensor, random_batch, softmax_attention

VALID = (24, 17)


def small_norm_heads(seed=0, b=2, h=4, n=24, d=8):
    """q, k small enough that exp(q·k/√d) is well conditioned, v of unit scale, and a mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) * s for s in (0.5, 0.5, 1.0))
    mask = torch.arange(n)[None, :] < torch.tensor(VALID)[:, None]
    return q, k, v, mask


def error_against_exact(num_features: int, seeds=(0, 1, 2)) -> float:
    """RMS error over real queries, averaged over draws of the features (fixed inputs)."""
    q, k, v, mask = small_norm_heads()
    exact = softmax_attention(q, k, v, mask)
    real = mask[:, None, :].expand(-1, q.shape[1], -1)
    errors = []
    for seed in seeds:
        torch.manual_seed(seed)
        module = PerformerAttention(32, 4, num_features=num_features).eval()
        errors.append((module.attend(q, k, v, mask) - exact)[real].pow(2).mean().sqrt())
    return torch.stack(errors).mean().item()


def test_error_against_exact_attention_falls_as_features_grow():
    few, some, many = (error_against_exact(m) for m in (16, 256, 4096))
    # Monte Carlo error ~ 1/sqrt(m): each step has 16x the features, so about 4x less error.
    assert some < few / 2
    assert many < some / 2
    assert many < 0.02


def test_hand_written_backward_is_the_gradient():
    q, k, v, mask = (t.double() if t.is_floating_point() else t for t in small_norm_heads(b=2, h=1, n=6, d=4))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    features = orthogonal_gaussian(8, 4).double()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: favor(q, k, v, mask, features), inputs)


def test_features_are_orthogonal_blocks_with_gaussian_norms():
    torch.manual_seed(0)
    features = orthogonal_gaussian(20, 8)
    directions = features / features.norm(dim=-1, keepdim=True)
    for block in (directions[:8], directions[8:16]):
        torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    assert features.shape == (20, 8)
    norms = orthogonal_gaussian(4096, 8).norm(dim=-1)
    # Chi with 8 degrees of freedom: E[norm²] = 8, and the norms are not all equal.
    assert abs(norms.pow(2).mean().item() - 8) < 0.5
    assert norms.std() > 0.5


def snapshots(module, x, mask, calls):
    """Feature buffer after each of ``calls`` forward calls in the module's current mode."""
    out = []
    for _ in range(calls):
        module(x, mask)
        out.append(module.features.clone())
    return out


def distinct_runs(features):
    """Indices (1-based call numbers) at which the features differ from the previous call's."""
    return [i + 1 for i in range(1, len(features)) if not torch.equal(features[i], features[i - 1])]


def test_redraw_happens_exactly_every_interval_in_training():
    torch.manual_seed(0)
    module = PerformerAttention(32, 4, num_features=16, redraw_interval=3).train()
    x, mask = random_batch(n=8, d_model=32, valid=(8, 5))
    first = module.features.clone()
    seen = snapshots(module, x, mask, 7)
    assert torch.equal(seen[0], first)
    # Each draw serves exactly 3 calls: new features at calls 4 and 7.
    assert distinct_runs(seen) == [4, 7]
    assert module.calls.item() == 7


def test_eval_never_redraws_nor_counts():
    torch.manual_seed(0)
    module = PerformerAttention(32, 4, num_features=16, redraw_interval=1).train()
    x, mask = random_batch(n=8, d_model=32, valid=(8, 5))
    module(x, mask)
    module.eval()
    before, calls = module.features.clone(), module.calls.item()
    seen = snapshots(module, x, mask, 4)
    assert all(torch.equal(s, before) for s in seen)
    assert module.calls.item() == calls
    torch.testing.assert_close(module(x, mask), module(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("interval", [0, None])
def test_interval_zero_or_none_never_redraws(interval):
    torch.manual_seed(0)
    module = PerformerAttention(32, 4, num_features=16, redraw_interval=interval).train()
    x, mask = random_batch(n=8, d_model=32, valid=(8, 5))
    first = module.features.clone()
    assert all(torch.equal(s, first) for s in snapshots(module, x, mask, 5))


def test_features_travel_with_the_state_dict():
    torch.manual_seed(0)
    source = PerformerAttention(32, 4, num_features=16, redraw_interval=2).train()
    x, mask = random_batch(n=8, d_model=32, valid=(8, 5))
    snapshots(source, x, mask, 3)
    torch.manual_seed(1)
    target = PerformerAttention(32, 4, num_features=16, redraw_interval=2)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.features, source.features) and target.calls.item() == 3
    torch.testing.assert_close(target.eval()(x, mask), source.eval()(x, mask), rtol=0, atol=0)


def test_padding_never_reaches_real_outputs():
    torch.manual_seed(0)
    module = PerformerAttention(32, 4, num_features=64).eval()
    x, mask = random_batch(n=24, d_model=32, valid=(20, 9))
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    y = module(x, mask)
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], module(noisy, mask)[mask], rtol=1e-5, atol=1e-6)
    # The same real tokens without any padding give the same outputs.
    short = module(x[1:, :9], mask[1:, :9])
    torch.testing.assert_close(y[1, :9], short[0], rtol=1e-5, atol=1e-6)


def largest_tensor_at(n: int) -> int:
    torch.manual_seed(0)
    return largest_tensor(PerformerAttention(16, 1), n)


def test_no_n_by_n_tensor_at_default_settings():
    shorter, longer = largest_tensor_at(1024), largest_tensor_at(2048)
    # Forward and backward at the default 256 features: nothing exceeds one head's N x m features.
    assert longer <= 2048 * 256 < 2048 * 2048
    # Linear, not quadratic, in length: doubling N doubles the largest tensor.
    assert longer <= 2.2 * shorter


def test_bf16_autocast_is_finite_and_close():
    torch.manual_seed(0)
    module = PerformerAttention(32, 4, num_features=64).eval()
    x, mask = random_batch(n=24, d_model=32, valid=(24, 1))
    x = x * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), module(x, mask), rtol=0.1, atol=0.3)


def test_trains_with_adam():
    first, last = fit_briefly(
        lambda: PerformerAttention(32, 4, num_features=32, redraw_interval=5, dropout=0.1), steps=30
    )
    assert last < 0.8 * first


@pytest.mark.parametrize("option", [{"num_features": 0}, {"redraw_interval": -1}])
def test_bad_options_are_refused(option):
    with pytest.raises(ValueError, match="performer.yaml"):
        PerformerAttention(32, 4, **option)
