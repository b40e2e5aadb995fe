"""The Hydra entry points behind train.py / eval.py and the installed `cast-train` / `cast-eval`.

    python train.py task=listops attention=cast [overrides...]      (or: cast-train ...)
    python train.py -m attention.num_clusters=8,16,32 seed=0,1,2
    python eval.py run_dir=outputs/runs/2026-01-01/12-00-00_listops_cast [split=val]
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

CONFIGS = "pkg://cast.configs"


def share_sweep_dir_with_ddp_ranks() -> None:
    """Pin this multirun's directory in sys.argv before Lightning copies it for the DDP ranks.

    Lightning starts each extra rank as `python train.py <argv>`; in a multirun that process
    replays the sweep in step with rank 0, and without a pinned directory ${now:...} would give it
    a second sweep directory.
    """
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    pinned = f"hydra.sweep.dir={HydraConfig.get().sweep.dir}"
    sys.argv = [a for a in sys.argv if not a.startswith("hydra.sweep.dir=")] + [pinned]


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities import rank_zero_only

    from cast.app.run import train
    from cast.app.summary import print_summary

    share_sweep_dir_with_ddp_ranks()
    try:
        results = train(cfg)
    except Exception as error:
        # In a sweep one failed job must not stop the others; its results.json says why it failed.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"job failed: {type(error).__name__}: {error}")
            return None
        raise
    if rank_zero_only.rank == 0:
        print_summary(results)
    return results.get(cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def eval_main(cfg: DictConfig) -> float | None:
    from cast.app.run import evaluate

    out = evaluate(cfg)
    print(f"{out['split']} accuracy {out['acc']:.4f}  ({out['checkpoint']})")
    return out["acc"]
