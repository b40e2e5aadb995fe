"""Sweep presets (+sweep=clusters, +sweep=lra), Optuna, the SLURM launcher preset, and DDP output dirs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from cast.app.results import read_results
from cast.app.run import train
from tests.conftest import CONFIGS, ROOT, TINY, compose_train
from tests.wandb_records import run_info

ATTENTIONS = ["vanilla", "cast", "clustered", "iclustered", "fastmax", "performer", "reformer"]
EXPERIMENTS = ["lra/listops", "lra/text", "lra/retrieval", "lra/image", "lra/pathfinder"]


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def run(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cluster_sweep_preset():
    cfg = compose_with_hydra("+sweep=clusters", "task=listops")
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert dict(cfg.hydra.sweeper.params) == {"attention.num_clusters": "8,16,32,64,128", "seed": "0"}
    assert cfg.attention._target_ == "cast.attention.cast.CASTAttention"
    assert cfg.hydra.sweep.dir.endswith("_clusters_listops")


def test_seed_sweep_preset():
    assert dict(compose_with_hydra("+sweep=seeds").hydra.sweeper.params) == {"seed": "0,1,2"}


def test_lra_sweep_names_every_mechanism_and_task():
    params = compose_with_hydra("+sweep=lra").hydra.sweeper.params
    assert params.attention.split(",") == ATTENTIONS
    assert params.experiment.split(",") == EXPERIMENTS


# Attention configs read only the experiment's num_clusters, so CAST on every task and every
# attention on one task cover what the 35 jobs can get wrong, at a third of the cost.
JOBS = [(e, "cast") for e in EXPERIMENTS] + [("lra/listops", a) for a in ATTENTIONS if a != "cast"]


@pytest.mark.parametrize("experiment,attention", JOBS)
def test_lra_sweep_jobs_compose(experiment, attention, tmp_path):
    job = ["+sweep=lra", f"experiment={experiment}", f"attention={attention}"]
    assert compose_with_hydra(*job).hydra.runtime.choices.task == experiment.split("/")[1]
    cfg = compose_train(tmp_path, job)
    assert get_class(cfg.attention._target_).name == attention
    OmegaConf.to_container(cfg, resolve=True)


def test_optuna_search_composes():
    cfg = compose_with_hydra("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and get_class(sweeper._target_)
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val_acc_best"
    assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "optim.warmup_steps", "model.dropout",
                                   "num_clusters"}
    # CAST reads the top-level num_clusters, so the search reaches its attention.
    cast = compose_with_hydra("hparams_search=optuna", "attention=cast", "num_clusters=16")
    assert cast.attention.num_clusters == 16


def test_slurm_launcher_preset_composes_without_submitting():
    cfg = compose_with_hydra("hydra/launcher=slurm")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (1, 1, 1440)
    assert launcher.partition is None
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["mem_gb"] == 64


class Submitted(Exception):
    """Stops a launch at the point where submitit would call sbatch."""


def test_slurm_preset_asks_for_the_signal_that_submitit_handles(tmp_path, monkeypatch):
    import submitit
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from submitit.slurm.slurm import SlurmExecutor, SlurmJobEnvironment

    class Recording(submitit.AutoExecutor):
        def map_array(self, fn, *args):
            raise Submitted(self._executor._make_submission_file_text("python -u -m submitit.core._submit", "0"))

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were there
    monkeypatch.setattr(submitit, "AutoExecutor", Recording)
    cfg = compose_with_hydra("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"]], initial_job_idx=0)
    sbatch = str(submitted.value)
    assert "#SBATCH --signal=USR2@120" in sbatch and "#SBATCH --time=1440" in sbatch
    # The job's handler listens for the same signal; Lightning's auto-requeue for another one.
    assert SlurmJobEnvironment._usr_sig() == signal.SIGUSR2
    assert SLURMEnvironment().requeue_signal != signal.SIGUSR2


@pytest.mark.slow
@pytest.mark.parametrize("max_num_timeout", [0, 1])
def test_time_limit_signal_writes_last_ckpt_and_ckpt_path_last_resumes(max_num_timeout, tiny_cfg, tmp_path,
                                                                        monkeypatch):
    """submitit's handler, installed as in a SLURM job, gets the time-limit signal at step 7."""
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, UncompletedJobError
    from submitit.slurm.slurm import SlurmJobEnvironment

    class TimeLimit(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                os.kill(os.getpid(), SlurmJobEnvironment._usr_sig())

    requeued = []
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", lambda self, countdown: requeued.append(countdown))
    monkeypatch.setattr(SignalHandler, "has_timed_out", lambda self: True)
    import cast.app.run as run_module

    original = run_module._instantiate_group
    monkeypatch.setattr(run_module, "_instantiate_group",
                        lambda group: original(group) + ([TimeLimit()] if group and "last" in group else []))
    launcher = instantiate(compose_with_hydra("hydra/launcher=slurm").hydra.launcher)
    job = DelayedSubmission(launcher, ["seed=0"])
    job.set_timeout(1440, max_num_timeout)
    signals = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    common = ("attention=vanilla", "trainer.max_steps=12", "ckpt_path=last")
    try:
        SlurmJobEnvironment()._handle_signals(SimpleNamespace(submitted_pickle=tmp_path / "submitted.pkl"), job)
        with pytest.raises(SystemExit if max_num_timeout else UncompletedJobError):
            train(tiny_cfg(*common))
    finally:
        for number, handler in signals.items():
            signal.signal(number, handler)
    assert requeued == ([0] if max_num_timeout else [])
    assert (tmp_path / "submitted.pkl").exists(), "submitit pickled the job to run again"
    run_dir = tmp_path / "run"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    assert read_results(run_dir)["status"] == "failed"

    monkeypatch.setattr(run_module, "_instantiate_group", original)
    results = train(tiny_cfg(*common))  # the requeued job: same directory, same overrides
    assert results["status"] == "ok" and results["steps"] == 12


def tiny(listops_dir: Path) -> list[str]:
    return TINY + [f"task.data_dir={listops_dir}"]


@pytest.mark.slow
def test_cluster_sweep_runs_and_the_command_line_wins(listops_dir, tmp_path):
    done = run("train.py", "-m", "+sweep=clusters", *tiny(listops_dir), "attention.num_clusters=2,4", "seed=3",
               "logger=wandb", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted((json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")),
                     key=lambda r: r["attention_options"]["num_clusters"])
    assert [(r["attention"], r["attention_options"]["num_clusters"], r["seed"], r["status"]) for r in results] == [
        ("cast", 2, 3, "ok"), ("cast", 4, 3, "ok")]
    # Each job's W&B run is named and tagged by what the sweep varies.
    runs = sorted(run_info(next(Path(r["run_dir"]).glob("wandb/offline-run-*/*.wandb")))["name"] for r in results)
    assert runs == ["listops-cast-seed3 attention.num_clusters=2", "listops-cast-seed3 attention.num_clusters=4"]
    info = run_info(next(Path(results[0]["run_dir"]).glob("wandb/offline-run-*/*.wandb")))
    assert info["tags"] == ["attention.num_clusters=2"] and info["group"] == "listops"
    done = run("scripts/report.py", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "report" / "clusters.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["task"] == "ListOps"
    for r in results:
        assert float(row[f"{r['attention_options']['num_clusters']}_mean"]) == pytest.approx(100 * r["test_acc"])


@pytest.mark.slow
def test_optuna_trials_are_runs_and_the_best_value_is_theirs(listops_dir, tmp_path):
    done = run("train.py", "hparams_search=optuna", *tiny(listops_dir), "attention=vanilla", "hydra.sweeper.n_trials=2",
               f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert best.best_value == max(r["val_acc_best"] for r in results)
    assert 1e-4 <= best.best_params["optim.lr"] <= 1e-1


@pytest.mark.slow
def test_ddp_run_writes_one_run_directory_and_tests_every_row_once(tmp_path):
    """Two CPU ranks (gloo) from the default run-dir pattern: rank 1 joins rank 0's directory.
    The test split has an odd number of rows, which Lightning's distributed sampler would pad
    with a repeated row; the run's own test accuracy must equal eval.py's on one device."""
    from tasks.listops_generator import write_release

    data = tmp_path / "listops"
    write_release(data, {"train": 96, "val": 31, "test": 47}, seed=1, min_length=8, max_length=60,
                  max_depth=4, workers=1, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    try:
        done = run(str(ROOT / "train.py"), *tiny(data), "attention=vanilla", "+trainer.strategy=ddp",
                   "trainer.devices=2", cwd=work, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("a 2-process CPU DDP run took over 120 s on this machine")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = list((work / "outputs" / "runs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    assert [p.parent for p in work.rglob("results.json")] == run_dirs
    assert (run_dirs[0] / "train_ddp_process_1.log").exists()  # rank 1 ran, in the same directory
    results = json.loads((run_dirs[0] / "results.json").read_text())
    assert results["status"] == "ok"
    evaluated = run(str(ROOT / "eval.py"), f"run_dir={run_dirs[0]}", cwd=work, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    exact = json.loads((run_dirs[0] / "eval.json").read_text())["acc"]
    assert results["test_acc"] == pytest.approx(exact, abs=1e-6)


@pytest.mark.slow
def test_ddp_inside_a_multirun_writes_one_sweep_directory(listops_dir, tmp_path):
    """Rank 1 replays the sweep in step with rank 0; the pinned sweep dir keeps it in rank 0's."""
    try:
        done = run(str(ROOT / "train.py"), "-m", *tiny(listops_dir), "attention=vanilla", "+trainer.strategy=ddp",
                   "trainer.devices=2", "seed=0,1", cwd=tmp_path, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("a 2-process CPU DDP multirun took over 180 s on this machine")
    assert done.returncode == 0, done.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    results = sorted(json.loads(p.read_text())["seed"] for p in sweeps[0].glob("*/results.json"))
    assert results == [0, 1]
