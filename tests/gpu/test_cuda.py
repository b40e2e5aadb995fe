"""What only a CUDA device can show: every mechanism on the GPU agrees with itself on the CPU, in
float32 and under bf16 autocast, and the fused kernels (flash, memory-efficient) serve vanilla and
CAST's blocks. Marked `cuda`: skipped where no CUDA device is visible; `make gpu-check` runs them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cast.app.paths import CONFIG_DIR
from tests.attention.reference import random_batch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
NAMES = sorted(p.stem for p in (CONFIG_DIR / "attention").glob("*.yaml"))
D_MODEL, HEADS = 64, 4


def build(name: str):
    cfg = OmegaConf.merge(OmegaConf.create({"num_clusters": 4}),
                          OmegaConf.create({"attention": OmegaConf.load(CONFIG_DIR / "attention" / f"{name}.yaml")}))
    torch.manual_seed(0)
    return instantiate(cfg.attention)(d_model=D_MODEL, n_heads=HEADS, dropout=0.0).eval()


def run(module, x, mask, device, autocast: bool):
    module = module.to(device)
    x = x.to(device).requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        y = module(x, mask.to(device))
    y.float().sum().backward()
    return y.float().cpu(), x.grad.float().cpu()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_mechanism_on_cuda_matches_cpu(name, autocast):
    x, mask = random_batch(b=2, n=256, d_model=D_MODEL, valid=(256, 131))
    module = build(name)
    y_cpu, g_cpu = run(module, x, mask, torch.device("cpu"), autocast=False)
    y, g = run(module, x, mask, torch.device("cuda"), autocast)
    tol = 3e-2 if autocast else 1e-3
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert (y[~mask] == 0).all(), "padded positions must stay exact zeros on the GPU"
    assert (y - y_cpu).norm() / y_cpu.norm() < tol
    assert (g - g_cpu).norm() / g_cpu.norm() < 5 * tol


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_fused_kernels_serve_vanilla_with_a_padding_mask(backend):
    """Vanilla calls SDPA with a boolean key mask: the named fused kernel must accept the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = build("vanilla").cuda()
    x, mask = random_batch(b=2, n=512, d_model=D_MODEL, valid=(512, 300))
    x, mask = x.cuda(), mask.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = module(x, mask).float()
        if backend == "FLASH_ATTENTION":
            # Flash takes no mask: the unpadded row through it must equal vanilla's masked output.
            q, k, v = (t[:1] for t in module.project(x[:1]))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v)
            assert torch.isfinite(out).all()
        else:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                y = module(x, mask).float()
            assert (y - reference).norm() / reference.norm() < 1e-2


def test_cast_blocks_run_through_sdpa_on_cuda_with_dropout():
    """On CUDA CAST's intra-cluster attention uses SDPA, which takes dropout in its fused kernels."""
    cfg = OmegaConf.load(CONFIG_DIR / "attention" / "cast.yaml")
    cfg = OmegaConf.merge(OmegaConf.create({"num_clusters": 16}), OmegaConf.create({"attention": cfg}))
    module = instantiate(cfg.attention)(d_model=D_MODEL, n_heads=HEADS, dropout=0.1).cuda().train()
    x, mask = random_batch(b=2, n=1024, d_model=D_MODEL, valid=(1024, 700))
    x = x.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x, mask.cuda())
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
