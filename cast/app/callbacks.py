"""Callbacks the run adds by itself: run statistics and plain progress logs off a terminal."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from cast.app.memory import peak_memory_mb  # noqa: F401 (run.py's results take the peak from here)


class RunStats(L.Callback):
    """Counts training samples and time spent in training batches, for samples_per_s."""

    def __init__(self):
        self.samples = 0
        self.train_time = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_time += time.perf_counter() - self._t0
        self.samples += int(batch["label"].shape[0]) * trainer.world_size

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.train_time if self.train_time > 0 else None


class PlainProgress(L.Callback):
    """Short log lines instead of a progress bar, for log files and batch jobs."""

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, every_n_steps)
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0:
            loss = trainer.callback_metrics.get("train/loss_step")
            loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
            rate = step / max(time.perf_counter() - self._t0, 1e-9)
            print(f"step {step}/{trainer.estimated_stepping_batches:.0f}{loss_text} ({rate:.2f} steps/s)", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            text = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            print(f"epoch {trainer.current_epoch} step {trainer.global_step}: {text}", flush=True)


class LastCheckpoint(L.Callback):
    """Keeps ``dirpath/last.ckpt`` current: every N steps, at the end of fit, and on any exception.

    A run that dies (an error, Ctrl-C, SLURM's SIGTERM, submitit's time-limit signal) therefore
    resumes with ``ckpt_path=last`` from the step it reached; only a hard kill (SIGKILL, power
    loss) loses up to N steps.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200):
        self.path = Path(dirpath) / "last.ckpt"
        self.every = every_n_train_steps

    def _save(self, trainer, collective: bool = True) -> None:
        if collective:
            trainer.save_checkpoint(self.path, weights_only=False)
        else:
            # After an exception the ranks are out of step (submitit's signal reaches rank 0's
            # handler only): rank 0 writes without the barrier that trainer.save_checkpoint ends with.
            trainer.strategy.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if trainer.state.fn == "fit":
            self._save(trainer, collective=False)
