"""cast/app/preflight.py: the checks and host settings train.py applies before the training stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cast.app import preflight
from cast.options import OptionError
from tests.conftest import ROOT, compose_train


def test_an_option_error_surfaces_from_the_config_alone(tmp_path):
    cfg = compose_train(tmp_path, ["attention=cast", "attention.clustering=bogus", f"task.data_dir={tmp_path}/none"])
    with pytest.raises(OptionError, match="clustering='bogus'"):
        preflight.check_config(cfg)
    preflight.check_config(compose_train(tmp_path, ["attention=cast", f"task.data_dir={tmp_path}/none"]))


def test_a_missing_checkpoint_surfaces_from_the_config_alone(tmp_path):
    cfg = compose_train(tmp_path, ["attention=vanilla", f"ckpt_path={tmp_path}/nope.ckpt"])
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*no such checkpoint"):
        preflight.check_config(cfg)


@pytest.mark.parametrize("load,expected", [(1.0, False), (1.6, True), (6.0, True)])
def test_busy_machine_warning_above_the_core_count(monkeypatch, load, expected):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    message = preflight.busy_cpu_message("use one thread")
    assert (message is not None) == expected
    if expected:
        assert message == f"load average {load:.1f} on 2 cores: other processes compete for the CPU; use one thread"


# train.py's host settings applied in a fresh process, then a 64 MiB block freed (as tests/bench
# measures the bench's own setting): is it kept for the next step or handed back to the OS?
HOST_PROBE = """
import sys
from pathlib import Path
import torch
from cast.app.preflight import tune_host
from cast.bench.benchmark import _proc_kb
from tests.conftest import compose_train
tune_host(compose_train(Path(sys.argv[1]), sys.argv[2:]))
block = torch.ones(64 * 2**20 // 4)  # above glibc's largest default mmap threshold
before = _proc_kb("VmRSS")
del block
print(torch.get_num_threads(), (before - _proc_kb("VmRSS")) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or os.uname().sysname != "Linux",
                    reason="glibc and /proc only")
@pytest.mark.parametrize("overrides,kept", [([], True), (["keep_freed_memory=false"], False)])
def test_training_on_cpu_keeps_freed_memory_as_the_bench_does_unless_switched_off(tmp_path, overrides, kept):
    out = subprocess.run([sys.executable, "-c", HOST_PROBE, str(tmp_path), "threads=2", *overrides],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    threads, returned_mb = int(out[0]), float(out[1])
    assert threads == 2
    if kept:
        assert returned_mb < 8, "a freed block must stay with the process for the next step"
    else:
        assert returned_mb > 56, "glibc's default hands a freed 64 MiB block back to the OS"
