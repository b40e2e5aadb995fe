"""What train.py checks and sets up before it imports the training stack.

Config and option errors must show within seconds: this module imports only torch, OmegaConf
and the configured attention class, never Lightning, W&B, datasets or the task's data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def check_config(cfg: DictConfig) -> None:
    """Resolve every interpolation, build one attention layer at the configured width (its
    option checks run in its constructor) and find the checkpoint to resume from."""
    OmegaConf.to_container(cfg, resolve=True)
    model = cfg.model
    layer = instantiate(cfg.attention)
    layer(d_model=model.d_model, n_heads=model.n_heads, dropout=model.attention_dropout, qkv_dim=model.get("qkv_dim"))
    resolve_ckpt(cfg.get("ckpt_path"), Path(cfg.paths.output_dir))


def resolve_ckpt(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``last`` means this run directory's checkpoints/last.ckpt, when there is one."""
    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint; pass a .ckpt file or 'last'")
    return ckpt_path


def busy_cpu_message(hint: str) -> str | None:
    """A warning when other processes already keep the cores busy, else None."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores - 0.5:
        return None
    return f"load average {load:.1f} on {cores} cores: other processes compete for the CPU; {hint}"


def runs_on_cpu(trainer: DictConfig) -> bool:
    accelerator = trainer.get("accelerator", "auto")
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def tune_host(cfg: DictConfig) -> None:
    """Threads (``threads``), glibc's allocator on CPU (``keep_freed_memory``) and a warning
    when the machine is already busy."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if not runs_on_cpu(cfg.trainer):
        return
    if cfg.get("keep_freed_memory", True):
        from cast.bench.benchmark import keep_freed_memory

        keep_freed_memory()  # the setting the benchmark's CPU timings are measured with
    threads = torch.get_num_threads()
    busy = busy_cpu_message(f"training may run many times slower with {threads} threads than with threads=1")
    if busy and threads > 1:
        print(f"train: {busy}", file=sys.stderr, flush=True)
