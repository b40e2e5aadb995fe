"""Shared fixtures: a tiny generated ListOps set and composed configs for fast CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from cast.app.paths import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A model and a run small enough to train in seconds on one CPU core: configs/debug/tiny.yaml,
# on ListOps cut to 64 tokens.
TINY = ["debug=tiny", "task.max_length=64", "progress=none"]


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count in this process (bench.main --threads) leaves it as it was."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def listops_dir(tmp_path_factory) -> Path:
    """A small generated ListOps set in the release layout (short trees, fixed seed)."""
    from tests.helpers.lra import small_listops

    return small_listops(tmp_path_factory.mktemp("listops"))


def compose_train(run_dir: Path, overrides: list[str], config_name: str = "train"):
    """Compose configs/train.yaml as `python train.py` would, with run_dir as the output dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path, listops_dir):
    """Factory: a tiny ListOps config writing into tmp_path/run (extra overrides appended)."""

    def make(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        base = TINY + [f"task.data_dir={listops_dir}", "task.num_workers=0"]
        return compose_train(run_dir, base + list(overrides))

    return make
