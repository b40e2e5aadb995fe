"""The names the application knows, read from where they are declared: no list to keep in step.

- a *mechanism* is a file configs/attention/NAME.yaml (its class lives in cast.attention);
- a *task* is a file configs/task/NAME.yaml; its facts (label, whether it counts in the LRA
  five-task average, whether its sequence is a square pixel grid, its column in the report) are
  class attributes of the datamodule its ``task._target_`` names, read without loading any data.

Adding a mechanism or a task is therefore one module plus one YAML; the LRA sweep preset
(configs/sweep/lra.yaml globs the groups), the report's rows and columns, the benchmark and the
tests all follow from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from cast.app.paths import CONFIG_DIR

BASELINE = "vanilla"  # the reference mechanism: first row of every table, the benchmark's ratios


@dataclass(frozen=True)
class Task:
    name: str           # the config name (task=NAME), also results.json's "task"
    label: str          # the column header, e.g. "ListOps", "Path-X"
    lra_average: bool   # counts in the LRA five-task average
    is_image: bool      # the sequence is a square pixel grid
    column: int         # position among the report's columns (ties: by name)
    target: str         # the datamodule class


def _root(config_dir: Path | None) -> Path:
    """The given configs folder, else the package's (looked up now, so a test can point it elsewhere)."""
    return Path(config_dir) if config_dir is not None else CONFIG_DIR


def mechanisms(config_dir: Path | None = None) -> list[str]:
    """Every configs/attention/*.yaml: the baseline first, then the others alphabetically."""
    names = sorted(p.stem for p in (_root(config_dir) / "attention").glob("*.yaml"))
    return sorted(names, key=lambda n: n != BASELINE)


def task_target(name: str, config_dir: Path | None = None) -> str:
    """The ``task._target_`` of configs/task/NAME.yaml, following its defaults list within the group."""
    path = _root(config_dir) / "task" / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such task config; the tasks are the files of {path.parent}")
    config = OmegaConf.load(path)
    target = OmegaConf.select(config, "task._target_")
    if target is not None:
        return target
    for entry in config.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            return task_target(entry, config_dir)
    raise ValueError(f"{path}: no task._target_ and no task config in its defaults list to take it from; "
                     "set task._target_ to the datamodule class")


def task(name: str, config_dir: Path | None = None) -> Task:
    target = task_target(name, config_dir)
    cls = get_class(target)
    return Task(name=name, label=cls.label or name, lra_average=cls.lra_average, is_image=cls.is_image,
                column=cls.report_column, target=target)


def tasks(config_dir: Path | None = None) -> list[Task]:
    """Every configs/task/*.yaml, in the report's column order."""
    found = [task(p.stem, config_dir) for p in (_root(config_dir) / "task").glob("*.yaml")]
    return sorted(found, key=lambda t: (t.column, t.name))


def lra_presets(config_dir: Path | None = None) -> set[str]:
    """The tasks that have an LRA protocol preset, configs/experiment/lra/NAME.yaml."""
    return {p.stem for p in (_root(config_dir) / "experiment" / "lra").glob("*.yaml")}
