"""train() and evaluate(): what the entry points and the tests call.

Both take a composed Hydra config (configs/train.yaml, configs/eval.yaml) and return a dict of
metrics, so sweepers can optimise the value and tests can assert on it.
"""

from __future__ import annotations

import json
import sys
import warnings
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cast.app.callbacks import PlainProgress, RunStats, StopOnSignal
from cast.app.interrupt import Interrupted, StopSignals, resume_command
from cast.app.memory import peak_memory_mb
from cast.app.preflight import resolve_ckpt
from cast.app.results import start_results, write_results
from cast.app.wandb_utils import finish_wandb, prepare_wandb_config, summarise_wandb
from cast.lit import LitClassifier


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from whose tensors do not fit the configured model."""


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, LitClassifier]:
    """The datamodule and the LightningModule of a config (same for train and eval)."""
    datamodule = instantiate(cfg.task)
    model = instantiate(
        cfg.model,
        attention=instantiate(cfg.attention),
        vocab_size=datamodule.vocab_size,
        num_classes=datamodule.num_classes,
        max_length=datamodule.max_length,
        pair=datamodule.is_pair,
    )
    if cfg.get("compile"):
        model.compile()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    return datamodule, LitClassifier(model, datamodule.num_classes, **optim)


def progress_callbacks(cfg: DictConfig) -> list[L.Callback]:
    mode = cfg.get("progress", "auto")
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    if mode == "rich":
        return [RichProgressBar()]
    every = cfg.trainer.get("log_every_n_steps") or 50
    return [PlainProgress(every, cfg.get("progress_every_s", 30))] if mode == "plain" else []


def _instantiate_group(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def make_trainer(cfg: DictConfig, out_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(out_dir),
        enable_progress_bar=any(isinstance(c, RichProgressBar) for c in callbacks),
    )


def check_checkpoint_fits(ckpt_path: str, lit: LitClassifier) -> None:
    """Refuse, in one message, a checkpoint whose tensors do not fit the model (Lightning would
    print one 'size mismatch' line per tensor) and name the overrides it was trained with."""
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    theirs, ours = saved.get("state_dict", {}), lit.state_dict()
    differ = [f"{k} {tuple(theirs[k].shape)} -> {tuple(v.shape)}" for k, v in ours.items()
              if k in theirs and theirs[k].shape != v.shape]
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if not (differ or missing or unexpected):
        return
    parts = [f"{len(differ)} tensors differ in shape (checkpoint -> this config): " + "; ".join(differ[:4])
             + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")] if differ else []
    for label, keys in (("missing from the checkpoint", missing), ("not in this model", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label}: " + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else ""))
    trained = saved.get("overrides")
    hint = (f"it was trained with the overrides: {' '.join(trained) or '(none)'}" if trained is not None
            else "resume with the overrides the run was trained with")
    raise CheckpointMismatchError(
        f"ckpt_path={ckpt_path} does not fit this config: {'. '.join(parts)}. Change the command line "
        f"back: {hint} (each run directory lists its overrides in .hydra/overrides.yaml, which this "
        "attempt has just rewritten with its own)")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the task's train split, pick the best validation checkpoint, test it.

    results.json in the run directory records the outcome, also when the run fails or is
    interrupted by SIGTERM/SIGINT (then :class:`Interrupted` is raised with the resume command).
    """
    out_dir = Path(cfg.paths.output_dir)
    results = start_results(cfg, out_dir)
    is_zero = rank_zero_only.rank == 0  # DDP ranks share rank 0's run directory
    if is_zero:
        write_results(out_dir, results)
    start = time.time()
    trainer = None
    # Mid-epoch resume is exact: the datamodule's state_dict records the position in the epoch
    # and its sampler skips what was seen, which Lightning's loader check cannot know.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Raised inside Lightning's own pytree helper on every fit with torch >= 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    progress = progress_callbacks(cfg)
    say = next((c.say for c in progress if isinstance(c, PlainProgress)), lambda text: None)
    with StopSignals() as stop:
        try:
            L.seed_everything(cfg.seed, workers=True)
            datamodule, lit = build(cfg)
            results["task"] = datamodule.name
            results["params"] = sum(p.numel() for p in lit.parameters())
            say(f"data: {datamodule.name} from {datamodule.data_dir}")
            datamodule.setup()
            results["test_majority_acc"] = _majority_rate(datamodule)
            stats = RunStats()
            callbacks = _instantiate_group(cfg.get("callbacks")) + [stats, StopOnSignal(stop)] + progress
            prepare_wandb_config(cfg)
            loggers = _instantiate_group(cfg.get("logger"))
            if not loggers:  # Lightning's LearningRateMonitor refuses a run without loggers
                callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            for logger in loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            trainer = make_trainer(cfg, out_dir, callbacks, loggers)
            ckpt_path = resolve_ckpt(cfg.get("ckpt_path"), out_dir)
            if ckpt_path:
                check_checkpoint_fits(ckpt_path, lit)
            trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
            best = _best_checkpoint(trainer)
            results["val_acc_best"] = _best_score(trainer)
            if cfg.get("test", True):
                tested = trainer.test(lit, datamodule=datamodule, ckpt_path=best, verbose=False)
                results["test_acc"] = tested[0].get("test/acc") if tested else None
            results.update(
                steps=trainer.global_step,
                samples_per_s=stats.samples_per_s,
                peak_mem_mb=peak_memory_mb(lit.device),
                best_checkpoint=best,
                status="ok",
            )
        except BaseException as error:
            if trainer is not None:
                results["steps"] = trainer.global_step
            if stop.received is None:
                if stop.handed_over is None:
                    results.update(status="failed", error=f"{type(error).__name__}: {error}")
                else:
                    # The signal's own handler (submitit: requeue at the time limit, then exit)
                    # ended the run: last.ckpt holds it, and the exception goes on to its end.
                    results.update(status="interrupted", signal=stop.handed_over.name,
                                   resume=resume_command(results["overrides"], out_dir))
                raise
            command = resume_command(results["overrides"], out_dir)
            name = stop.received.name
            results.update(status="interrupted", signal=name, resume=command)
            raise Interrupted(stop.received, f"interrupted by {name} at step {results['steps']}; "
                              f"checkpoints/last.ckpt holds it. Resume with:\n  {command}") from error
        finally:
            results["wall_time_s"] = round(time.time() - start, 3)
            if is_zero:
                write_results(out_dir, results)
            if trainer is not None:
                summarise_wandb(trainer, results)
            finish_wandb()
    return results


def _majority_rate(datamodule) -> float | None:
    """Accuracy of always answering the most frequent test label: the bar to clear."""
    labels = getattr(datamodule, "splits", {}).get("test", {}).get("label")
    if labels is None or len(labels) == 0:
        return None
    return float(torch.bincount(labels.long()).max()) / len(labels)


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def _best_score(trainer: L.Trainer) -> float | None:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_score is not None:
            return float(cb.best_model_score)
    value = trainer.callback_metrics.get("val/acc")
    return None if value is None else float(value)


def load_run(run_dir: str | Path, data_root: str | None = None, ckpt_path: str | None = None):
    """A finished run's saved config, datamodule, and LightningModule holding its best weights.

    Returns (config, datamodule, module, checkpoint path); used by eval.py and scripts/visualize.py.
    """
    run_dir = Path(run_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        raise FileNotFoundError(f"run_dir={run_dir}: no .hydra/config.yaml; pass a run directory made by train.py")
    run_cfg = OmegaConf.load(saved)
    OmegaConf.update(run_cfg, "paths.output_dir", str(run_dir), force_add=True)
    if data_root:
        OmegaConf.update(run_cfg, "data_root", data_root, force_add=True)
    checkpoint = Path(ckpt_path) if ckpt_path else find_checkpoint(run_dir)
    L.seed_everything(run_cfg.seed, workers=True)
    datamodule, lit = build(run_cfg)
    lit.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    return run_cfg, datamodule, lit.eval(), checkpoint


def eval_trainer(trainer_cfg: DictConfig, root: Path) -> L.Trainer:
    """The run's trainer settings (accelerator, precision, limits) on one device in one process.

    A run trained with trainer=ddp would otherwise relaunch on every device; in one process the
    datamodule reads every row once, in order, and no distributed sampler is wanted.
    """
    return instantiate(
        trainer_cfg, devices=1, num_nodes=1, strategy="auto", use_distributed_sampler=False,
        logger=False, callbacks=[], enable_progress_bar=False, default_root_dir=str(root),
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Reload a run's own saved config and best checkpoint and test it again."""
    run_dir = Path(cfg.run_dir)
    run_cfg, datamodule, lit, ckpt = load_run(run_dir, cfg.get("data_root"), cfg.get("ckpt_path"))
    trainer = eval_trainer(run_cfg.trainer, run_dir / "eval")
    split = cfg.get("split", "test")
    loop = trainer.test if split == "test" else trainer.validate
    metrics = loop(lit, datamodule=datamodule, verbose=False)[0]
    prefix = "test" if split == "test" else "val"
    out = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "split": split, "acc": metrics.get(f"{prefix}/acc")}
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def find_checkpoint(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        if (ckpts / name).exists():
            return ckpts / name
    raise FileNotFoundError(f"{ckpts}: no best.ckpt or last.ckpt; was the run trained with checkpointing?")

