"""Sweep presets (+sweep=clusters, +sweep=lra), Optuna, the SLURM launcher preset, and DDP output dirs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from cast.app import registry, reporting
from cast.app.results import REQUIRED, read_results, write_results
from cast.app.run import train
from cast.bench.benchmark import Spec, discover
from tasks.base import LRADataModule
from tests.conftest import CONFIGS, ROOT, TINY, compose_train
from tests.wandb_records import run_info

ATTENTIONS = registry.mechanisms()
# Path-X (16,384 tokens) has a preset but stays out of the default LRA sweep.
LRA_TASKS = sorted(registry.lra_presets() - {"pathx"})


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


def sweep_jobs(config_dir: Path, preset: str, *arguments: str) -> list[dict[str, str]]:
    """The jobs `train.py -m PRESET ARGUMENTS...` launches, expanded as Hydra's basic sweeper does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        cfg = compose("train", overrides=[preset], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + list(arguments)
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create(config_loader=loader).parse_overrides(params), None)
    return [dict(item.lstrip("+").split("=", 1) for item in job) for job in batch]


def test_lra_sweep_runs_every_mechanism_on_every_lra_preset_but_pathx():
    jobs = sweep_jobs(CONFIGS, "+sweep=lra")
    assert len(jobs) == len(ATTENTIONS) * len(LRA_TASKS) == 35
    assert {(j["experiment/lra"], j["attention"], j["seed"]) for j in jobs} == {
        (t, a, "0") for t in LRA_TASKS for a in ATTENTIONS}


def test_lra_sweep_subsets_from_the_command_line():
    jobs = sweep_jobs(CONFIGS, "+sweep=lra", "attention=vanilla,cast", "+experiment/lra=text")
    assert sorted((j["experiment/lra"], j["attention"]) for j in jobs) == [("text", "cast"), ("text", "vanilla")]


# Attention configs read only the experiment's num_clusters, so CAST on every task and every
# attention on one task cover what the 35 jobs can get wrong, at a third of the cost.
JOBS = [(t, "cast") for t in LRA_TASKS] + [("listops", a) for a in ATTENTIONS if a != "cast"]


@pytest.mark.parametrize("task,attention", JOBS)
def test_lra_sweep_jobs_compose(task, attention, tmp_path):
    job = ["+sweep=lra", f"+experiment/lra={task}", f"attention={attention}"]
    assert compose_with_hydra(*job).hydra.runtime.choices.task == task
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
    # Requeued or out of requeues, the time limit stopped it: interrupted, never "failed".
    saved = read_results(run_dir)
    assert (saved["status"], saved["signal"]) == ("interrupted", "SIGUSR2") and saved["resume"].endswith("ckpt_path=last")

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


class ToyDataModule(LRADataModule):
    """A task that exists only in the test below: its facts are all the registry needs."""

    name = "toy"
    label = "Toy"


def test_a_new_mechanism_and_task_join_the_sweep_the_report_and_the_bench(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "attention" / "aardvark.yaml").write_text((configs / "attention" / "vanilla.yaml").read_text())
    (configs / "task" / "toy.yaml").write_text(
        f"# @package _global_\ntask:\n  _target_: {__name__}.ToyDataModule\n  data_dir: nowhere\n  max_length: 8\n")
    (configs / "experiment" / "lra" / "toy.yaml").write_text("# @package _global_\ndefaults:\n  - override /task: toy\n")

    jobs = sweep_jobs(configs, "+sweep=lra")
    assert len(jobs) == (len(ATTENTIONS) + 1) * (len(LRA_TASKS) + 1)
    assert {"experiment/lra": "toy", "attention": "aardvark", "seed": "0"} in jobs
    assert Spec("aardvark") in discover(configs / "attention")

    monkeypatch.setattr(registry, "CONFIG_DIR", configs)
    assert registry.mechanisms()[:3] == ["vanilla", "aardvark", "cast"]  # the baseline, then alphabetical
    assert registry.tasks()[-1] == registry.Task("toy", "Toy", False, False, 100, f"{__name__}.ToyDataModule")
    for i, (task, attention) in enumerate([("toy", "cast"), ("toy", "aardvark"), ("listops", "vanilla")]):
        write_results(tmp_path / "runs" / str(i), {**dict.fromkeys(REQUIRED), "task": task, "attention": attention,
                                                   "attention_options": {}, "status": "ok", "test_acc": 0.5})
    table = reporting.lra_table(reporting.collect([tmp_path / "runs"]), paper=False)
    assert [row.label for row in table.rows] == ["vanilla", "aardvark", "cast"]
    assert table.keys[-2:] == ["toy", "avg"] and table.columns[-2:] == ["Toy", "Avg"]
