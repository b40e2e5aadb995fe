"""Every configs/attention/*.yaml builds a mechanism that honours the contract of base.py."""

from __future__ import annotations


import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cast.app.paths import CONFIG_DIR as CONFIGS
from tests.attention.reference import random_batch

CONFIG_DIR = CONFIGS / "attention"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
D_MODEL, HEADS = 32, 4


def build(name: str, **over):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg = OmegaConf.merge(OmegaConf.create({"num_clusters": 4}), OmegaConf.create({"attention": cfg}))
    factory = instantiate(cfg.attention)
    torch.manual_seed(0)
    return factory(d_model=D_MODEL, n_heads=HEADS, dropout=0.0, **over).eval()


def test_the_three_first_mechanisms_are_there():
    assert "vanilla" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_name_matches_config(name):
    assert build(name).name == name


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_zero_padding(name):
    module = build(name)
    x, mask = random_batch(n=24, d_model=D_MODEL, valid=(24, 13))
    y = module(x, mask)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert (y[~mask] == 0).all(), "padded positions must come out as exact zeros"
    assert y[mask].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_padded_tokens_never_change_real_outputs(name):
    module = build(name)
    x, mask = random_batch(n=24, d_model=D_MODEL, valid=(20, 9))
    noisy = x.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 50
    torch.testing.assert_close(module(x, mask)[mask], module(noisy, mask)[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_single_real_token_and_gradients_are_finite(name):
    module = build(name).train()
    x, mask = random_batch(n=16, d_model=D_MODEL, valid=(16, 1))
    x.requires_grad_(True)
    y = module(x, mask)
    assert torch.isfinite(y).all()
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_moves_from_vanilla(name):
    """Shared projection names: vanilla's weights load into any mechanism that has all four."""
    module = build(name)
    vanilla = build("vanilla").state_dict()
    own = module.state_dict()
    shared = {k: v for k, v in vanilla.items() if k in own}
    assert {"q_proj.weight", "v_proj.weight", "out_proj.weight"} <= set(shared)
    module.load_state_dict(shared, strict=False)
    for k, v in shared.items():
        assert torch.equal(module.state_dict()[k], v)


def test_refuses_bad_inputs():
    module = build("vanilla")
    x, mask = random_batch(n=8, d_model=D_MODEL, valid=(8, 3))
    with pytest.raises(TypeError, match="bool"):
        module(x, mask.long())
    with pytest.raises(ValueError, match="mask"):
        module(x, mask[:, :4])
    with pytest.raises(ValueError, match="divisible"):
        build("vanilla", qkv_dim=30)
