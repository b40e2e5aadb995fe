"""Fidelity mode of scripts/bench.py: each mechanism's output error against exact softmax
attention on the same random inputs, so speed can be read next to approximation quality."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.bench.benchmark import CONFIG_DIR, VANILLA, Shape, Spec, failure, load_attention


def shared_qk_attention(module, x: Tensor, mask: Tensor, chunk: int = 1024) -> Tensor:
    """Reformer's exact attention through ``module``'s projections: keys are the L2-normalised
    queries and a query skips itself (inputs here have no padding and N > 1). Query chunks keep
    the (chunk, N) scores small at long lengths."""
    q, _, v = module.project(x)
    k = F.normalize(q, dim=-1)
    n, keys = q.shape[2], torch.arange(q.shape[2], device=q.device)
    parts = []
    for start in range(0, n, chunk):
        rows = keys[start:start + chunk]
        allowed = (rows[:, None] != keys[None, :]) & mask[:, None, None, :]
        parts.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=allowed))
    return module.output(torch.cat(parts, dim=2), mask)


def fidelity_error(spec: Spec, length: int, shape: Shape, scale: float, device: str,
                   config_dir: Path = CONFIG_DIR, seed: int = 0) -> tuple[float, str]:
    """||y - y_exact||_F / ||y_exact||_F of one forward pass, and what y_exact was.

    The mechanism gets vanilla's q/k/v/out projections (its own extra parameters keep their
    seeded initialisation); inputs are N(0, scale²), so a larger scale gives sharper attention.
    A mechanism without k_proj (shared QK, Reformer) is compared with shared-QK exact attention.
    """
    d_model = shape.heads * shape.head_dim
    torch.manual_seed(seed)
    exact = load_attention(VANILLA, config_dir)(d_model=d_model, n_heads=shape.heads, dropout=0.0, qkv_dim=d_model)
    module = load_attention(spec, config_dir)(d_model=d_model, n_heads=shape.heads, dropout=0.0, qkv_dim=d_model)
    unexpected = set(module.load_state_dict(exact.state_dict(), strict=False).unexpected_keys)
    if unexpected - {"k_proj.weight", "k_proj.bias"}:
        raise ValueError(f"{spec.label} has no {sorted(unexpected)}: vanilla's weights cannot be copied into it")
    exact, module = exact.to(device).eval(), module.to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(shape.batch, length, d_model, generator=g) * scale).to(device)
    mask = torch.ones(shape.batch, length, dtype=torch.bool, device=device)
    with torch.no_grad():
        y = module(x, mask)
        y_exact = shared_qk_attention(module, x, mask) if unexpected else exact(x, mask)
    reference = "shared-QK softmax (keys = normalised queries, no self)" if unexpected else "softmax"
    return (torch.linalg.norm(y - y_exact) / torch.linalg.norm(y_exact)).item(), reference


def fidelity_rows(specs: list[Spec], lengths: list[int], scales: list[float], shape: Shape, device: str,
                  config_dir: Path = CONFIG_DIR, seed: int = 0) -> list[dict]:
    """One row per (mechanism, input scale, length) with its ``rel_error`` or its failure."""
    rows = []
    for spec, scale, n in ((spec, scale, n) for spec in specs for scale in scales for n in lengths):
        row = dict(device=device, mechanism=spec.name, options=spec.options_str, label=spec.label, length=n,
                   batch=shape.batch, heads=shape.heads, head_dim=shape.head_dim, input_scale=scale, status="ok")
        try:
            row["rel_error"], row["reference"] = fidelity_error(spec, n, shape, scale, device, config_dir, seed)
        except Exception as exc:
            row["status"] = failure(exc)
        print(f"[fidelity] {spec.label} at {n}, scale {scale:g}: {row.get('rel_error', row['status'])}", flush=True)
        rows.append(row)
    return rows
