"""results.json: the one file per run that scripts/report.py reads.

It is written when the run starts (``status: running``), rewritten atomically when it ends
(``ok``; ``failed`` with the error; ``interrupted`` by a signal, with the signal, the step and the
command that resumes it), so a run that dies still leaves a trace the report lists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

REQUIRED = (
    "task", "attention", "attention_options", "seed", "val_acc_best", "test_acc", "params",
    "steps", "wall_time_s", "samples_per_s", "peak_mem_mb", "status",
)


def start_results(cfg, out_dir: str | Path) -> dict[str, Any]:
    """The record of a run that is starting: what it trains, and nothing measured yet."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.attention, resolve=True)
    return {
        "task": getattr(get_class(cfg.task._target_), "name", cfg.task._target_),
        "attention": getattr(get_class(cfg.attention._target_), "name", cfg.attention._target_),
        "attention_options": {k: v for k, v in options.items() if k not in ("_target_", "_partial_")},
        "seed": cfg.seed,
        "val_acc_best": None,
        "test_acc": None,
        "params": None,
        "steps": 0,
        "wall_time_s": 0.0,
        "samples_per_s": None,
        "peak_mem_mb": None,
        "status": "running",
        "run_dir": str(out_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".results.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in results.items()}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the run that wrote it may have been cut off") from e
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return data
