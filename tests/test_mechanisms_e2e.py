"""Every attention config trains end to end on ListOps through train(), as the CLI runs it.

`python train.py task=listops attention=<name> trainer.fast_dev_run=true`, for each name, in
full precision and under bf16-mixed autocast.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cast.app.run import train
from tests.attention.test_contract import NAMES
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", NAMES)
def test_fast_dev_run(tiny_cfg, name, precision):
    results = train(tiny_cfg(f"attention={name}", "trainer.fast_dev_run=true", f"trainer.precision={precision}"))
    assert results["status"] == "ok"
    assert results["attention"] == name
    assert results["steps"] == 1
    assert 0.0 <= results["test_acc"] <= 1.0


def test_every_mechanism_from_the_command_line(listops_dir, tmp_path):
    """One multirun over all names: the CLI path, in one process start."""
    done = subprocess.run(
        [sys.executable, "train.py", "-m", *TINY, f"task.data_dir={listops_dir}", "trainer.fast_dev_run=true",
         f"attention={','.join(NAMES)}", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert sorted(r["attention"] for r in results) == sorted(NAMES)
    assert all(r["status"] == "ok" for r in results), [r.get("error") for r in results]
