"""End to end: train() as the CLI calls it, eval round trip, resume after a crash, failures."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import lightning as L
import pytest
import torch

from cast.app.results import REQUIRED, read_results
from cast.app.run import CheckpointMismatchError, evaluate, train
from tests.conftest import ROOT, TINY, compose_train
from tests.wandb_records import summary as wandb_summary

pytestmark = pytest.mark.slow


def test_train_writes_results_and_checkpoints(tiny_cfg, tmp_path):
    results = train(tiny_cfg("attention=vanilla"))
    saved = read_results(tmp_path / "run")
    assert set(REQUIRED) <= set(saved)
    assert saved["status"] == "ok" and saved["task"] == "listops" and saved["attention"] == "vanilla"
    assert saved["steps"] == 6 and saved["params"] > 0 and saved["samples_per_s"] > 0
    assert 0 <= saved["val_acc_best"] <= 1 and 0 <= saved["test_acc"] <= 1
    assert saved["attention_options"] == {"impl": "fused"}
    assert saved == json.loads(json.dumps(results))
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    assert (tmp_path / "run" / "csv" / "metrics.csv").exists()


def test_eval_reproduces_test_accuracy(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    results = train(tiny_cfg("attention=vanilla", "trainer.max_steps=9"))
    cfg = tiny_cfg("attention=vanilla")  # compose again to get a clean Hydra state
    from omegaconf import OmegaConf

    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    out = evaluate(OmegaConf.create({"run_dir": str(run_dir), "split": "test", "ckpt_path": None, "data_root": None}))
    assert out["acc"] == pytest.approx(results["test_acc"], abs=0)
    assert out["checkpoint"].endswith("best.ckpt")


class Crash(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return state["global_step"], state["state_dict"]


def test_resume_after_a_crash_continues_at_the_same_step(tiny_cfg, tmp_path, monkeypatch):
    common = ("attention=vanilla", "model.dropout=0.0", "trainer.max_steps=20", "trainer.val_check_interval=10",
              "callbacks.last.every_n_train_steps=1000")
    train(tiny_cfg(*common, run_dir=tmp_path / "straight"))
    step_straight, straight = _weights(tmp_path / "straight")
    assert step_straight == 20

    crashed = tmp_path / "crashed"
    import cast.app.run as run_module

    original = run_module._instantiate_group

    def with_crash(group):
        items = original(group)
        return items + [Crash(13)] if group is not None and "checkpoint" in group else items

    monkeypatch.setattr(run_module, "_instantiate_group", with_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*common, run_dir=crashed))
    assert read_results(crashed)["status"] == "failed"
    assert _weights(crashed)[0] == 13
    monkeypatch.setattr(run_module, "_instantiate_group", original)

    results = train(tiny_cfg(*common, "ckpt_path=last", run_dir=crashed))
    assert results["status"] == "ok" and results["steps"] == 20
    step, resumed = _weights(crashed)
    assert step == 20
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=f"{key} differs after resume")


def test_ddp_resume_after_a_crash_continues_at_the_same_step(listops_dir, tmp_path):
    """Two CPU ranks (gloo), 5 batches per rank and epoch: a crash at step 13 is mid-epoch."""
    common = [*TINY, f"task.data_dir={listops_dir}", "attention=vanilla", "model.dropout=0.0",
              "+trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=20", "trainer.val_check_interval=10",
              "callbacks.last.every_n_train_steps=1000"]
    crash = ["+callbacks.crash._target_=tests.test_train.Crash", "+callbacks.crash.at_step=13"]

    def train_py(run_dir, *extra):
        try:
            return subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *extra, f"hydra.run.dir={run_dir}"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.skip("a 2-process CPU DDP run took over 120 s on this machine")

    done = train_py(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = tmp_path / "crashed"
    done = train_py(crashed, *crash)
    assert done.returncode != 0 and "simulated crash" in done.stderr
    assert _weights(crashed)[0] == 13
    done = train_py(crashed, "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_results(crashed)["steps"] == 20
    (step, resumed), (_, straight) = _weights(crashed), _weights(tmp_path / "straight")
    assert step == 20
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=f"{key} differs after a DDP resume")


def test_two_identical_cpu_runs_are_identical(tiny_cfg, tmp_path):
    a = train(tiny_cfg("attention=vanilla", run_dir=tmp_path / "a"))
    b = train(tiny_cfg("attention=vanilla", run_dir=tmp_path / "b"))
    assert a["test_acc"] == b["test_acc"] and a["val_acc_best"] == b["val_acc_best"]
    assert torch.equal(_weights(tmp_path / "a")[1]["model.head.2.weight"], _weights(tmp_path / "b")[1]["model.head.2.weight"])


def test_failed_run_records_the_error(tiny_cfg, tmp_path):
    with pytest.raises(Exception, match="pooling"):
        train(tiny_cfg("attention=vanilla", "model.pooling=median"))
    saved = read_results(tmp_path / "run")
    assert saved["status"] == "failed" and "pooling" in saved["error"]


def test_missing_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*no such checkpoint"):
        train(tiny_cfg("attention=vanilla", f"ckpt_path={tmp_path}/nope.ckpt"))


def test_wandb_offline_run_records_best_val_accuracy(tiny_cfg, tmp_path):
    results = train(tiny_cfg("attention=vanilla", "logger=wandb"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B must log offline by default"
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
    import wandb

    assert wandb.run is None, "the run must be finished so the next multirun job starts fresh"
    summary = wandb_summary(files[0])
    assert summary["val_acc_best"] == pytest.approx(results["val_acc_best"])
    assert summary["test_acc"] == pytest.approx(results["test_acc"])


def test_compose_without_data_names_the_command(tmp_path):
    cfg = compose_train(tmp_path / "run", ["attention=vanilla", f"task.data_dir={tmp_path}/empty", "progress=none"])
    with pytest.raises(FileNotFoundError, match="prepare_data.py listops"):
        train(cfg)


def test_resume_with_another_model_is_one_message_naming_the_tensors_and_the_runs_overrides(tiny_cfg, tmp_path):
    train(tiny_cfg("attention=vanilla", "trainer.max_steps=2"))
    with pytest.raises(CheckpointMismatchError) as refused:
        train(tiny_cfg("attention=vanilla", "trainer.max_steps=4", "model.d_model=48", "ckpt_path=last"))
    message = str(refused.value)
    assert "\n" not in message and "does not fit this config" in message
    assert "model.embedding.tokens.weight" in message and re.search(r"\(\d+, 32\) -> \(\d+, 48\)", message)
    assert re.search(r"; and \d+ more", message), "a long list is summarised"
    assert "trainer.max_steps=2" in message and "model.d_model" not in message.split("trained with")[1]
    assert ".hydra/overrides.yaml" in message


def test_plain_progress_announces_each_phase(tiny_cfg, capsys):
    train(tiny_cfg("attention=vanilla", "progress=plain"))
    phases = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
              if line.split(":")[0] in ("data", "fit", "validation", "test")]
    assert phases == ["data", "fit", "validation", "validation", "test"]


def test_debug_overfit_drives_the_training_loss_down_on_one_listops_batch(listops_dir, tmp_path):
    train(compose_train(tmp_path / "run", ["debug=overfit", "task.max_length=64", "progress=none",
                                           f"task.data_dir={listops_dir}"]))
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss_step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert len(losses) >= 8
    assert max(losses[-2:]) < 0.3 * losses[0], losses
