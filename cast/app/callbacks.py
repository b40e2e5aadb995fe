"""Callbacks the run adds by itself: run statistics, plain progress logs off a terminal, last.ckpt."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L



class RunStats(L.Callback):
    """Counts the training samples and the time spent in this process's training batches, for
    samples_per_s (a resumed run counts only the steps it ran itself)."""

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
    """Short log lines instead of a progress bar, for log files and batch jobs.

    A line when each phase starts (data, fit, validation, test), one every ``every_n_steps``
    training steps, and one at least every ``every_s`` seconds whatever the step count, so a slow
    run on a busy machine still shows that it is alive.
    """

    def __init__(self, every_n_steps: int = 50, every_s: float = 30.0, clock=time.monotonic):
        self.every = max(1, every_n_steps)
        self.every_s = every_s
        self.clock = clock
        self._t0 = self._last = clock()
        self._first_step = 0

    def say(self, text: str) -> None:
        print(text, flush=True)
        self._last = self.clock()

    def _overdue(self) -> bool:
        return self.every_s > 0 and self.clock() - self._last >= self.every_s

    def on_train_start(self, trainer, pl_module):
        self._t0 = self.clock()
        self._first_step = trainer.global_step  # a resumed run's rate counts only its own steps
        if trainer.is_global_zero:
            self.say(f"fit: step {trainer.global_step}/{trainer.estimated_stepping_batches:.0f}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or self._overdue()):
            loss = trainer.callback_metrics.get("train/loss_step")
            loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
            rate = (step - self._first_step) / max(self.clock() - self._t0, 1e-9)
            self.say(f"step {step}/{trainer.estimated_stepping_batches:.0f}{loss_text} ({rate:.2f} steps/s)")

    def _evaluating(self, trainer, phase: str) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.say(f"{phase}: step {trainer.global_step}")

    def _eval_batch(self, trainer, phase: str, batch_idx: int, batches) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and self._overdue():
            self.say(f"{phase}: batch {batch_idx + 1}/{batches[0] if batches else '?'}")

    def on_validation_start(self, trainer, pl_module):
        self._evaluating(trainer, "validation")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._eval_batch(trainer, "validation", batch_idx, trainer.num_val_batches)

    def on_test_start(self, trainer, pl_module):
        self._evaluating(trainer, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._eval_batch(trainer, "test", batch_idx, trainer.num_test_batches)

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            text = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            self.say(f"epoch {trainer.current_epoch} step {trainer.global_step}: {text}")


class StopOnSignal(L.Callback):
    """Raises cast.app.interrupt.Interrupted at the first batch boundary after SIGTERM/SIGINT, where
    weights, optimizer and data position agree (LastCheckpoint then saves them)."""

    def __init__(self, signals):
        self.signals = signals

    def on_fit_start(self, trainer, pl_module):
        self.signals.fitting = True
        self.signals.stop_if_asked()

    def on_fit_end(self, trainer, pl_module):
        self.signals.fitting = False

    def on_exception(self, trainer, pl_module, exception):
        self.signals.fitting = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.signals.stop_if_asked()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.signals.stop_if_asked()


@contextmanager
def _without_barrier(strategy):
    """Silence the strategy's barrier for one call (an instance attribute shadows the method)."""
    strategy.barrier = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del strategy.barrier


class LastCheckpoint(L.Callback):
    """Keeps ``dirpath/last.ckpt`` current: every N steps, at the end of fit, and on any exception.

    A run that dies (an error, Ctrl-C, SLURM's SIGTERM, submitit's time-limit signal) therefore
    resumes with ``ckpt_path=last`` from the step it reached; a hard kill (SIGKILL, power loss)
    resumes from the last periodic save, exactly as if it had stopped there. Each save goes to a
    temporary file renamed over last.ckpt, so a kill during a save leaves the previous one whole.
    Every checkpoint of the run also records the run's overrides, which a resume with a config
    that does not fit the weights names (cast.app.run).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200, overrides: list[str] | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every = every_n_train_steps
        self.overrides = list(overrides or [])
        self._training = False

    def _save(self, trainer, collective: bool = True) -> None:
        tmp = self.path.with_name(f".last.ckpt.{os.getpid()}.tmp")
        if collective:
            trainer.save_checkpoint(tmp, weights_only=False)
        else:
            # After an exception the ranks are out of step (submitit's signal reaches rank 0's
            # handler only): a barrier would wait for ranks that are stuck in a collective.
            with _without_barrier(trainer.strategy):
                trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:  # only rank 0 writes checkpoint files
            os.replace(tmp, self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["overrides"] = self.overrides

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_train_start(self, trainer, pl_module):
        self._training = True

    def on_exception(self, trainer, pl_module, exception):
        # Not before training started: a resume that fails while setting up (or restoring) would
        # otherwise replace the checkpoint it resumes from with fresh weights.
        if trainer.state.fn == "fit" and self._training:
            self._save(trainer, collective=False)
