"""Weights & Biases glue: never block, record the best (not the last) numbers, finish cleanly,
tell the jobs of a sweep apart.

W&B runs offline unless the user sets ``logger.wandb.offline=false``; an online request with no
credentials falls back to offline with a warning instead of waiting at a login prompt. Offline
runs sync later with ``wandb sync <run_dir>/wandb/offline-run-*``.

In a multirun each job's run name and tags carry the overrides the sweep varies (e.g.
``listops-cast-seed0 attention.num_clusters=16``), so the W&B runs table tells the jobs apart.
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


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def swept_overrides() -> list[str]:
    """This multirun job's overrides of the keys its sweep varies: the sweeper's params (presets,
    Optuna) and the command line's sweeps (``a=1,2``, ``range(...)``); [] outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    hydra_cfg = HydraConfig.get()
    keys = {str(k) for k in (hydra_cfg.sweeper.get("params") or {})}
    arguments = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    try:
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(arguments) if o.is_sweep_override()}
    except OverrideParseException:  # an argv that is not Hydra's (a launcher's own process): the params suffice
        pass
    # seed, task and attention are in the default name already; W&B's own settings tell no job apart
    keys = {k for k in keys - {"seed", "task", "attention"} if not k.startswith("logger.")}
    return [o for o in hydra_cfg.overrides.task if _override_key(o) in keys]


def prepare_wandb_config(cfg: DictConfig) -> None:
    """Make an online W&B request safe before the logger is built; name a sweep job by what
    distinguishes it."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    swept = swept_overrides()
    if swept:
        with open_dict(cfg):
            cfg.logger.wandb.name = " ".join([str(wandb_cfg.name), *swept])
            cfg.logger.wandb.tags = [*wandb_cfg.get("tags", []), *swept]
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
