"""cast/callbacks.py: after an exception last.ckpt is written without a barrier."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cast.app.callbacks import LastCheckpoint


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
