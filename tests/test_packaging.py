"""The wheel: the library works from it without the repository, and it carries the configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

USE_THE_LIBRARY = """
import functools
import sys
import torch
from cast.attention.cast import CASTAttention
from cast.lit import LitClassifier
from cast.models import LRAClassifier

model = LRAClassifier(attention=functools.partial(CASTAttention, num_clusters=2),
                      vocab_size=20, num_classes=3, max_length=16, d_model=16, n_heads=2, n_layers=1, mlp_dim=32)
lit = LitClassifier(model, num_classes=3)
ids = torch.randint(1, 20, (2, 16))
logits = model({"input_ids": ids, "mask": ids > 0})
assert logits.shape == (2, 3)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "hydra", "wandb", "datasets")
                or m.startswith("cast.app") or m.startswith("cast.bench"))
assert not leaked, f"the library imported the application: {leaked}"
print("library ok from", __import__("cast").__file__)
"""

COMPOSE = """
from hydra import compose, initialize_config_module
from hydra.utils import get_class
with initialize_config_module(version_base="1.3", config_module="cast.configs"):
    cfg = compose("train", overrides=["attention=performer", "task=pathx"])
print(get_class(cfg.attention._target_).__name__, cfg.task.max_length)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("cast_lra-*.whl"))


def test_the_wheel_carries_every_config_and_both_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"cast/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)[:5]
    assert {"cast/attention/cast/layer.py", "cast/lit.py", "cast/app/cli.py", "tasks/base.py"} <= names


def test_the_library_and_the_configs_work_from_the_installed_wheel_alone(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    for code, expected in ((USE_THE_LIBRARY, f"library ok from {target}"), (COMPOSE, "PerformerAttention 16384")):
        done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert expected in done.stdout
