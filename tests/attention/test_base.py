"""The shared projections of cast/attention/base.py: ``linears`` is one autograd node for several
nn.Linear of one input, and must behave exactly like calling them one by one."""

import pytest
import torch
from torch import nn

from cast.attention.base import linears


def layers_and_input(seed=0, d_in=12, widths=(8, 8, 3)):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, w) for w in widths]
    return layers, torch.randn(2, 5, d_in)


def grads(layers, x):
    return [x.grad] + [p.grad for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_outputs_and_gradients_equal_the_layers_one_by_one(x_needs_grad):
    layers, x = layers_and_input()
    targets = [torch.randn(2, 5, layer.out_features) for layer in layers]
    results = []
    for fused in (True, False):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(x_needs_grad)
        outs = linears(xi, *layers) if fused else tuple(layer(xi) for layer in layers)
        sum((o * t).sum() for o, t in zip(outs, targets)).backward()
        results.append((outs, grads(layers, xi)))
    (fused_outs, fused_grads), (outs, one_by_one) = results
    for a, b in zip(fused_outs, outs):
        torch.testing.assert_close(a, b)
    for a, b in zip(fused_grads, one_by_one):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)


def test_a_projection_whose_output_is_unused_gets_no_gradient():
    layers, x = layers_and_input()
    q, k, gate = linears(x.requires_grad_(True), *layers)
    (q * k).sum().backward()
    assert layers[2].weight.grad is None and layers[2].bias.grad is None
    assert layers[0].weight.grad is not None and x.grad is not None


def test_bfloat16_autocast_computes_in_its_dtype_and_returns_float_gradients():
    layers, x = layers_and_input()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = linears(x, *layers)
        reference = tuple(layer(x) for layer in layers)
    for out, ref in zip(outs, reference):
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref)
    sum(o.float().sum() for o in outs).backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for layer in layers for p in layer.parameters())
    expected = sum(layer.weight.sum(0) for layer in layers).expand_as(x)
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)
