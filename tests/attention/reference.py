"""Slow, obviously-correct references that the mechanism tests compare against."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Exact attention over valid keys: q, k, v (B, h, N, d), mask (B, N) -> (B, h, N, d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_batch(b=2, n=24, d_model=32, valid=(24, 17), seed=0):
    """x (b, n, d_model) and a mask whose row i has ``valid[i]`` real tokens at the front."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d_model, generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(valid)[:, None]
    return x, mask


def exact(module, x: Tensor, mask: Tensor) -> Tensor:
    """Exact softmax attention through the module's own projections: what it must equal in a limit."""
    q, k, v = module.project(x)
    return module.output(softmax_attention(q, k, v, mask), mask)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def largest_tensor(module, n: int = 256, backward: bool = True) -> int:
    """Elements of the largest tensor made in a forward (and backward) pass at length n."""
    x, mask = random_batch(b=1, n=n, d_model=module.d_model, valid=(n - 10,))
    if not backward:
        with torch.no_grad(), LargestTensor() as probe:
            module.eval()(x, mask)
        return probe.numel
    x.requires_grad_(True)
    with LargestTensor() as probe:
        module.train()(x, mask).sum().backward()
    return probe.numel


def assert_bf16_finite(module, n: int, valid: tuple[int, ...]) -> None:
    """Under bf16 autocast the output is finite with zeros at padding, and every gradient is finite."""
    x, mask = random_batch(n=n, d_model=module.d_model, valid=valid)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()
    y.float().pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def fit_briefly(build_attention, steps: int = 50, n: int = 40) -> tuple[float, float]:
    """Loss before and after a few Adam steps of a tiny classifier around ``build_attention()``.

    Every attention parameter must receive a finite gradient at every step.
    """
    torch.manual_seed(0)
    attention = build_attention()
    d_model = attention.d_model
    model = nn.ModuleDict(dict(embed=nn.Embedding(10, d_model), attention=attention, head=nn.Linear(d_model, 2)))
    tokens = torch.randint(0, 10, (16, n))
    mask = torch.arange(n)[None, :] < torch.randint(n // 2, n + 1, (16, 1))
    labels = torch.randint(0, 2, (16,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        h = model["embed"](tokens)
        h = h + model["attention"](h, mask)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = nn.functional.cross_entropy(model["head"](pooled), labels)
        optimiser.zero_grad()
        loss.backward()
        for name, p in model["attention"].named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimiser.step()
        losses.append(loss.item())
    return losses[0], losses[-1]
