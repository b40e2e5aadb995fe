"""Weights & Biases glue: never block, record the best (not the last) numbers, finish cleanly.

W&B runs offline unless the user sets ``logger.wandb.offline=false``; an online request with no
credentials falls back to offline with a warning instead of waiting at a login prompt. Offline
runs sync later with ``wandb sync <run_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, open_dict


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


def prepare_wandb_config(cfg: DictConfig) -> None:
    """Make an online W&B request safe before the logger is built."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    if not wandb_cfg.get("offline", True) and not has_credentials():
        print(
            "W&B: online logging was asked for but no credentials were found (WANDB_API_KEY or "
            "`wandb login`); logging offline instead. Sync later with `wandb sync`.",
            file=sys.stderr,
        )
        with open_dict(cfg):
            cfg.logger.wandb.offline = True


def summarise_wandb(trainer, results: dict[str, Any]) -> None:
    """Put the run's final numbers (best val accuracy, test accuracy) in each W&B run summary."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            summary = logger.experiment.summary
            for key in ("val_acc_best", "test_acc", "params", "steps", "samples_per_s", "peak_mem_mb", "status"):
                if results.get(key) is not None:
                    summary[key] = results[key]


def finish_wandb() -> None:
    """End the active run so the next job of a multirun starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
