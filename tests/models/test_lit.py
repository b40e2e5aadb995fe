"""cast/lit.py: optim.lr is the peak rate of every schedule, the LRA presets step through LRA's
exact learning rates, and the rate of every logged step reaches csv/metrics.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cast.app.run import train
from cast.lit import LitClassifier, lr_factor
from tests.conftest import CONFIGS, compose_train

# The LRA repository's configs: factors, base learning rate, warmup, num_train_steps (the cosine
# configs' steps_per_cycle is num_train_steps too). Image and Pathfinder count an epoch as
# TRAIN_EXAMPLES // batch_size steps: 45,000 // 256 = 175, 160,000 // 512 = 312, 160,000 // 64 = 2,500.
LRA = {
    "listops": ("rsqrt", 0.05, 1000, 5000),
    "text": ("rsqrt", 0.05, 8000, 20000),
    "retrieval": ("rsqrt", 0.05, 8000, 5000),
    "image": ("cosine", 5e-4, 175, 175 * 200),
    "pathfinder": ("cosine", 1e-3, 312, 312 * 200),
    "pathx": ("cosine", 1e-3, 2500, 2500 * 200),
}
STEPPED = 40_000  # longer schedules (Pathfinder, Path-X): stepped this far, the rest read off the scheduler


def lra_rate(schedule: str, base: float, warmup: int, cycle: int, step: int) -> float:
    """train_utils.create_learning_rate_scheduler of the LRA code, at LRA's step (from 0)."""
    rate = base * min(1.0, step / warmup)
    if schedule == "rsqrt":
        return rate / math.sqrt(max(step, warmup))
    progress = max(0.0, (step - warmup) / cycle)
    return rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def scheduled(lit: LitClassifier, total: int):
    """configure_optimizers as Lightning calls it, for a run of ``total`` optimiser steps."""
    lit.trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = lit.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def lit_for(optim) -> LitClassifier:
    return LitClassifier(nn.Linear(2, 2), 2, **OmegaConf.to_container(optim, resolve=True))


def test_every_lra_preset_is_there():
    assert {p.stem for p in (CONFIGS / "experiment" / "lra").glob("*.yaml")} == set(LRA)


@pytest.mark.parametrize("task", sorted(LRA))
def test_lra_presets_step_through_lras_rates(task, tmp_path):
    schedule, base, warmup, steps = LRA[task]
    cfg = compose_train(tmp_path, [f"experiment=lra/{task}"])
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.trainer.max_steps) == (schedule, warmup, steps)
    optimizer, scheduler = scheduled(lit_for(cfg.optim), cfg.trainer.max_steps)
    optimizer.step()  # no gradients: changes nothing, but the scheduler may now step on its own
    for step in range(min(steps, STEPPED)):
        expected = lra_rate(schedule, base, warmup, steps, step)
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], expected, rel_tol=1e-9, abs_tol=1e-15), (task, step)
        scheduler.step()
    for step in [*range(STEPPED, steps, 997), steps - 1]:
        rate = cfg.optim.lr * scheduler.lr_lambdas[0](step)
        assert math.isclose(rate, lra_rate(schedule, base, warmup, steps, step), rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize("schedule", ["rsqrt", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 50])
def test_lr_is_the_peak_of_every_schedule(schedule, warmup):
    factors = [lr_factor(step, schedule, warmup, 400) for step in range(400)]
    assert max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) == warmup
    assert factors[0] == (0.0 if warmup else 1.0)


def test_schedule_shapes():
    assert lr_factor(25, "rsqrt", 100, 1000) == pytest.approx(0.25)
    assert lr_factor(400, "rsqrt", 100, 1000) == pytest.approx(0.5)  # sqrt(100 / 400)
    assert lr_factor(10 + 50, "cosine", 10, 100) == pytest.approx(0.5)  # half a cycle of 100 steps
    assert lr_factor(99, "cosine", 0, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor(5, "constant", 10, 100) == 0.5 and lr_factor(50, "constant", 10, 100) == 1.0


def test_the_headline_command_peaks_at_optim_lr(tmp_path):
    cfg = compose_train(tmp_path, ["task=listops", "attention=cast"])
    optimizer, scheduler = scheduled(lit_for(cfg.optim), cfg.trainer.max_steps)
    rates = []
    for _ in range(cfg.optim.warmup_steps + 2):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(cfg.optim.lr)


def test_the_learning_rate_of_every_step_is_in_the_csv(tiny_cfg):
    cfg = tiny_cfg("optim.schedule=rsqrt", "optim.lr=0.01", "optim.warmup_steps=3", "trainer.max_steps=8")
    train(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c.startswith("lr-")]
    assert columns, f"no lr-* column in {list(rows[0])}"
    logged = {int(r["step"]): [float(r[c]) for c in columns] for r in rows if r[columns[0]]}
    assert sorted(logged) == list(range(8))
    for step, rates in logged.items():
        assert rates == pytest.approx([0.01 * lr_factor(step, "rsqrt", 3, 8)] * len(columns)), step


def test_no_logger_leaves_the_monitor_out(tiny_cfg):
    assert train(tiny_cfg("logger=none"))["status"] == "ok"


def test_the_peak_rate_reaches_the_optimiser():
    lit = LitClassifier(nn.Linear(2, 2), 2, lr=0.3, schedule="constant", warmup_steps=0)
    optimizer, _ = scheduled(lit, 10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 0.3]
    assert isinstance(optimizer, torch.optim.AdamW)
