"""The Hydra entry points behind train.py / eval.py and the installed `cast-train` / `cast-eval`.

    python train.py task=listops attention=cast [overrides...]      (or: cast-train ...)
    python train.py -m attention.num_clusters=8,16,32 seed=0,1,2
    python eval.py run_dir=outputs/runs/2026-01-01/12-00-00_listops_cast [split=val]

train.py checks the config before it imports Lightning or loads data (cast.app.preflight), prints
data, option and checkpoint errors as one block without a traceback (HYDRA_FULL_ERROR=1 shows
it), and exits 1 on an error, 128 + the signal number when SIGTERM or SIGINT stopped it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from cast.app.interrupt import Interrupted
from cast.app.preflight import check_config, tune_host

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


# Errors a user fixes in the data or on the command line: (module, class names). Looked up only
# in modules already imported, so that reporting them imports nothing heavy.
USER_ERRORS = (("tasks.base", ("DataNotFoundError", "DataFormatError")), ("cast.options", ("OptionError",)),
               ("cast.app.run", ("CheckpointMismatchError",)))


def user_error(error: BaseException) -> BaseException | None:
    """The data, option or checkpoint error behind ``error`` (unwrapping Hydra's instantiation
    errors), or None for any other error."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    kinds = tuple(getattr(sys.modules[module], name) for module, names in USER_ERRORS if module in sys.modules
                  for name in names)
    return error if isinstance(error, kinds) else None


def record_early_failure(cfg: DictConfig, error: Exception) -> None:
    """results.json for a sweep job whose config check failed before train() started."""
    from cast.app.results import start_results, write_results

    out_dir = Path(cfg.paths.output_dir)
    failed = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    write_results(out_dir, {**start_results(cfg, out_dir), **failed})


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    share_sweep_dir_with_ddp_ranks()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    started = False
    try:
        check_config(cfg)
        tune_host(cfg)
        from cast.app.run import train

        started = True
        results = train(cfg)
    except Interrupted as stop:
        # A sweep stops here too: the signal was meant for the whole process, not for one job.
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except Exception as error:
        if multirun:
            # One failed job must not stop the others; its results.json says why it failed.
            if not started:
                record_early_failure(cfg, error)
            print(f"job failed: {type(error).__name__}: {error}")
            return None
        clear = user_error(error)
        if clear is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {clear}\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
              file=sys.stderr)
        sys.exit(1)
    from lightning.pytorch.utilities import rank_zero_only

    from cast.app.summary import print_summary

    if rank_zero_only.rank == 0:
        print_summary(results)
    return results.get(cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def eval_main(cfg: DictConfig) -> float | None:
    from cast.app.run import evaluate

    out = evaluate(cfg)
    print(f"{out['split']} accuracy {out['acc']:.4f}  ({out['checkpoint']})")
    return out["acc"]
