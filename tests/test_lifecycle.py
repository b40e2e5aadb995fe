"""A real `python train.py` killed, stopped by a signal, or refused: what it leaves and how it resumes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from cast.app.results import read_results
from cast.app.run import train
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

SLOW_STEPS = ["+callbacks.throttle._target_=tests.test_lifecycle.Throttle"]


class Throttle(L.Callback):
    """Slows each training step, so that a signal reliably lands in the middle of fit."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.25)


def train_py(listops_dir: Path, *args: str, multirun: bool = False) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), *TINY,
            f"task.data_dir={listops_dir}", *args]


def default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a terminal gives them. A shell that starts a job in the
    background (as a CI harness may start this suite) ignores SIGINT, and train.py rightly leaves
    an ignored signal ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)


def checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=False)["global_step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, step: int, timeout: float = 240) -> None:
    """Until ``path`` holds a checkpoint at ``step`` or later (its save is atomic, so whole)."""
    deadline = time.monotonic() + timeout
    while (checkpoint_step(path) or 0) < step:
        if proc.poll() is not None:
            pytest.fail(f"train.py ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"train.py did not reach step {step} within {timeout} s on this machine")
        time.sleep(0.1)


def weights(run_dir: Path):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return state["global_step"], state["state_dict"]


# One thread in every process of a comparison: another thread count sums in another order, and
# Adam turns the rounding noise of a near-zero gradient (k_proj.bias under softmax) into full steps.
EXACT = ["attention=vanilla", "model.dropout=0.0", "trainer.max_steps=20", "trainer.val_check_interval=10", "threads=1"]


def train_with_one_thread(cfg):
    """train() in this process as train.py would run with threads=1 (other tests may leave another count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(before)


def test_sigkill_after_a_periodic_checkpoint_resumes_to_an_uninterrupted_runs_weights(listops_dir, tiny_cfg, tmp_path):
    """10 batches an epoch, a periodic last.ckpt every 3 steps, SIGKILL soon after the one of step 6."""
    periodic = ["callbacks.last.every_n_train_steps=3"]
    train_with_one_thread(tiny_cfg(*EXACT, *periodic, run_dir=tmp_path / "straight"))
    step_straight, straight = weights(tmp_path / "straight")
    assert step_straight == 20

    killed = tmp_path / "killed"
    proc = start(train_py(listops_dir, *EXACT, *periodic, *SLOW_STEPS, f"hydra.run.dir={killed}"), tmp_path)
    wait_for_checkpoint(proc, killed / "checkpoints" / "last.ckpt", 6)
    proc.kill()
    proc.communicate()
    assert 6 <= checkpoint_step(killed / "checkpoints" / "last.ckpt") < 20

    done = subprocess.run(train_py(listops_dir, *EXACT, *periodic, f"hydra.run.dir={killed}", "ckpt_path=last"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step, resumed = weights(killed)
    assert step == 20
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=f"{key} differs after SIGKILL and resume")


def test_sigterm_saves_records_and_prints_the_resume_command_and_exits_143(listops_dir, tmp_path):
    run_dir = tmp_path / "run"
    steps = ["attention=vanilla", "trainer.max_steps=12", "callbacks.last.every_n_train_steps=2"]
    proc = start(train_py(listops_dir, *steps, *SLOW_STEPS, f"hydra.run.dir={run_dir}"), tmp_path)
    wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt", 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    saved = read_results(run_dir)
    assert (saved["status"], saved["signal"]) == ("interrupted", "SIGTERM")
    assert 2 <= saved["steps"] < 12 and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == saved["steps"]
    command = saved["resume"]
    assert command.endswith(f"hydra.run.dir={run_dir} ckpt_path=last") and "trainer.max_steps=12" in command
    assert command in stderr and "Traceback" not in stderr

    argv = shlex.split(command)
    assert argv[:2] == ["python", str(ROOT / "train.py")]
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_results(run_dir)["status"] == "ok" and read_results(run_dir)["steps"] == 12


# A job manager's own SIGUSR2 handler, as submitit installs it for the SLURM time limit: it requeues
# the job (here: nothing) and exits.
SUBMITIT_LIKE = ("import os, runpy, signal, sys; signal.signal(signal.SIGUSR2, lambda s, f: sys.exit(-1)); "
                 "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_a_job_managers_time_limit_signal_is_left_to_it_and_recorded_as_interrupted(listops_dir, tmp_path):
    run_dir = tmp_path / "run"
    steps = ["attention=vanilla", "trainer.max_steps=12", "callbacks.last.every_n_train_steps=2"]
    command = train_py(listops_dir, *steps, *SLOW_STEPS, f"hydra.run.dir={run_dir}")
    proc = start([command[0], "-c", SUBMITIT_LIKE, *command[1:]], tmp_path)
    wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt", 2)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 255, stderr[-3000:]        # the handler's own exit, sys.exit(-1)
    saved = read_results(run_dir)
    assert (saved["status"], saved["signal"]) == ("interrupted", "SIGUSR2"), saved
    assert 2 <= saved["steps"] < 12 and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == saved["steps"]
    assert saved["resume"].endswith(f"hydra.run.dir={run_dir} ckpt_path=last")


def test_sigint_stops_a_multirun_as_interrupted_not_failed_and_exits_130(listops_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["attention=vanilla", "trainer.max_steps=12", "callbacks.last.every_n_train_steps=2", "seed=0,1",
            *SLOW_STEPS, f"hydra.sweep.dir={sweep}"]
    proc = start(train_py(listops_dir, *args, multirun=True), tmp_path)
    wait_for_checkpoint(proc, sweep / "0" / "checkpoints" / "last.ckpt", 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    saved = read_results(sweep / "0")
    assert (saved["status"], saved["signal"]) == ("interrupted", "SIGINT") and "error" not in saved
    assert f"hydra.run.dir={sweep / '0'}" in saved["resume"] and "seed=0" in saved["resume"]
    assert "job failed" not in stdout
    assert not (sweep / "1").exists(), "the signal stops the whole sweep"


def test_data_and_option_errors_print_one_block_without_a_traceback(listops_dir, tmp_path):
    missing = train_py(listops_dir, "attention=vanilla", f"task.data_dir={tmp_path}/empty")
    done = subprocess.run(missing, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "prepare_data.py listops" in done.stderr and "Traceback" not in done.stderr
    assert "\nError: " in "\n" + done.stderr and "HYDRA_FULL_ERROR=1" in done.stderr
    full = subprocess.run(missing, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "prepare_data.py listops" in full.stderr


def test_failed_sweep_jobs_record_option_and_data_errors(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *TINY, "attention=cast",
                           "attention.clustering=bogus,topk", f"task.data_dir={tmp_path}/empty",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    option, data = (json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1"))
    assert option["status"] == "failed" and "OptionError" in option["error"] and "clustering='bogus'" in option["error"]
    assert data["status"] == "failed" and "DataNotFoundError" in data["error"]


# The entry point run in a subprocess; afterwards, which heavy libraries had been imported.
ENTRY_PROBE = """
import sys, time
from cast.app.cli import train_main
sys.argv = ["train.py", "attention=cast", "attention.clustering=bogus", "hydra.run.dir=" + sys.argv[1]]
try:
    train_main()
except SystemExit as stop:
    print("exit", stop.code)
print("heavy", sorted(m for m in ("lightning", "wandb", "datasets", "tasks.base") if m in sys.modules))
"""


def test_an_option_error_comes_before_lightning_wandb_datasets_or_data(tmp_path):
    done = subprocess.run([sys.executable, "-c", ENTRY_PROBE, str(tmp_path / "run")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split("\n")[-3:-1] == ["exit 1", "heavy []"], done.stdout + done.stderr[-3000:]
    assert "clustering='bogus' must be one of ('topk', 'sa_topk')" in done.stderr and "Traceback" not in done.stderr


def test_a_task_option_error_prints_one_block_without_a_traceback(listops_dir, tmp_path):
    bad = train_py(listops_dir, "attention=vanilla", "task=pathfinder", "task.difficulty=medium")
    done = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "difficulty='medium' must be one of" in done.stderr and "configs/task/pathfinder.yaml" in done.stderr
