"""cast/app/callbacks.py: last.ckpt after an exception without a barrier; plain progress lines by time."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cast.app.callbacks import LastCheckpoint, PlainProgress


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise RuntimeError("simulated crash")


def fit(tmp_path, *callbacks) -> L.Trainer:
    trainer = L.Trainer(max_steps=8, callbacks=[LastCheckpoint(str(tmp_path), every_n_train_steps=2), *callbacks],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(BoringModel())
    return trainer


def test_after_an_exception_rank_zero_saves_without_waiting_for_the_other_ranks(tmp_path, monkeypatch):
    """An exception on one rank only (submitit's time-limit signal) leaves the others in a
    collective; a barrier there would hang until SLURM kills the job."""
    barriers = []

    def barrier(self, name=None):
        barriers.append((name, self.lightning_module.trainer.state.status))

    monkeypatch.setattr("lightning.pytorch.strategies.SingleDeviceStrategy.barrier", barrier)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, Crash())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 5
    assert ("Trainer.save_checkpoint", "interrupted") not in barriers
    assert ("Trainer.save_checkpoint", "running") in barriers  # periodic saves stay collective


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def trainer_at(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, is_global_zero=True, estimated_stepping_batches=100, callback_metrics={},
                           sanity_checking=False, current_epoch=0, num_val_batches=[40], num_test_batches=[40])


def test_plain_progress_prints_a_line_at_least_every_30_s_whatever_the_step_count(capsys):
    clock = Clock()
    progress = PlainProgress(every_n_steps=1000, every_s=30, clock=clock)
    trainer = trainer_at(0)
    progress.on_train_start(trainer, None)
    for step, now in [(1, 10), (2, 29), (3, 31), (4, 40), (5, 62)]:
        trainer.global_step, clock.now = step, now
        progress.on_train_batch_end(trainer, None, None, None, step)
    progress.on_validation_start(trainer, None)
    for batch, now in [(0, 70), (1, 93)]:
        clock.now = now
        progress.on_validation_batch_end(trainer, None, None, None, batch)
    assert capsys.readouterr().out.splitlines() == [
        "fit: step 0/100", "step 3/100 (0.10 steps/s)", "step 5/100 (0.08 steps/s)", "validation: step 5",
        "validation: batch 2/40"]


def test_plain_progress_rate_after_a_resume_counts_only_this_processs_steps(capsys):
    clock = Clock()
    progress = PlainProgress(every_n_steps=10, every_s=0, clock=clock)
    progress.on_train_start(trainer_at(100), None)
    clock.now = 20.0
    progress.on_train_batch_end(trainer_at(110), None, None, None, 9)
    assert capsys.readouterr().out.splitlines()[-1] == "step 110/100 (0.50 steps/s)"


class CrashInSetup(L.Callback):
    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("simulated crash before training")


def test_an_exception_before_training_starts_leaves_last_ckpt_alone(tmp_path):
    """A resume that fails while it sets up must not replace the checkpoint it would resume from."""
    (tmp_path / "last.ckpt").write_bytes(b"the checkpoint of an earlier run")
    with pytest.raises(RuntimeError, match="before training"):
        fit(tmp_path, CrashInSetup())
    assert (tmp_path / "last.ckpt").read_bytes() == b"the checkpoint of an earlier run"
