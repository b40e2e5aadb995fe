"""A few hundred GPU steps of every experiment=lra/* preset, on fixture data in the real formats.

Marked `cuda` (skipped without a device). Each run's numbers are appended to
$GPU_CHECK_OUT/presets.csv, which `make gpu-check` puts into its report.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from cast.app import registry
from cast.app.run import train
from tests.conftest import compose_train
from tests.helpers.lra import write_every_task

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "200"))
FIELDS = ("preset", "attention", "status", "steps", "samples_per_s", "peak_mem_mb", "val_acc_best", "test_acc",
          "wall_time_s", "error")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_every_task(tmp_path_factory.mktemp("data"), pathfinder_count=200, pathx_count=40)


def record(row: dict) -> None:
    out = os.environ.get("GPU_CHECK_OUT")
    if not out:
        return
    path = Path(out) / "presets.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


@pytest.mark.parametrize("attention", ["vanilla", "cast"])
@pytest.mark.parametrize("preset", sorted(registry.lra_presets()))
def test_lra_preset_trains_on_the_gpu(data_dirs, tmp_path, preset, attention):
    cfg = compose_train(tmp_path / "run", [
        f"experiment=lra/{preset}", f"attention={attention}", "trainer=gpu", f"task.data_dir={data_dirs[preset]}",
        f"trainer.max_steps={STEPS}", "trainer.max_epochs=null", f"trainer.val_check_interval={STEPS // 2}",
        "trainer.check_val_every_n_epoch=null", "trainer.limit_val_batches=4", "trainer.limit_test_batches=4",
        "trainer.num_sanity_val_steps=0", "progress=none", "logger=csv",
    ])
    results = train(cfg)
    record({"preset": preset, "attention": attention, **results})
    assert results["status"] == "ok"
    assert results["steps"] == STEPS
