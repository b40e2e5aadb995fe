"""The command line as a user types it: train.py, eval.py, multiruns, and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def tiny(listops_dir: Path) -> list[str]:
    return TINY + [f"task.data_dir={listops_dir}", "attention=vanilla"]


def test_train_then_eval_from_the_command_line(listops_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run("train.py", *tiny(listops_dir), f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test acc" in done.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok"
    assert (run_dir / ".hydra" / "config.yaml").exists()

    evaluated = run("eval.py", f"run_dir={run_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"test accuracy {results['test_acc']:.4f}" in evaluated.stdout
    assert json.loads((run_dir / "eval.json").read_text())["acc"] == results["test_acc"]


def test_multirun_runs_every_job_and_survives_a_failing_one(listops_dir, tmp_path):
    sweep = tmp_path / "sweep"
    done = run("train.py", "-m", *tiny(listops_dir), "model.pooling=cls,median", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 4
    statuses = sorted((r["seed"], r["status"]) for r in results)
    assert statuses == [(0, "failed"), (0, "ok"), (1, "failed"), (1, "ok")]
    assert all("pooling" in r["error"] for r in results if r["status"] == "failed")


@pytest.mark.parametrize("group,name", [("task", "listopz"), ("attention", "performr")])
def test_unknown_names_list_the_valid_ones(group, name):
    done = run("train.py", f"{group}={name}")
    assert done.returncode != 0
    assert "Available options" in done.stderr and ("listops" in done.stderr or "vanilla" in done.stderr)


def test_prepare_data_listops_writes_the_release_layout(tmp_path):
    done = run("scripts/prepare_data.py", "listops", "--out", str(tmp_path), "--num-train", "20", "--num-val", "5",
               "--num-test", "5", "--min-length", "10", "--max-length", "50", "--workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "listops-1000" / "basic_val.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == 6


def seconds(*args: str, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    return time.perf_counter() - start, done


@pytest.mark.parametrize("task", ["text", "image"])
def test_prepare_data_offline_fails_in_one_line_within_seconds(task, tmp_path):
    """An unresolvable hub (what offline looks like) fails at once instead of after the hub client's
    ~30 s of printed retries. Timed against the imports alone, since shared CI machines vary."""
    env = {**os.environ, "HF_ENDPOINT": "http://hub.invalid", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    imports, _ = seconds("-c", f"import cast.app.prepare, tasks.{task}, tasks.sources, datasets, huggingface_hub", env=env)
    took, done = seconds("scripts/prepare_data.py", task, "--out", str(tmp_path / task), env=env)
    assert done.returncode == 1
    err = done.stderr.strip()
    assert "\n" not in err and "cannot reach the Hugging Face hub" in err and str(tmp_path / task) in err
    assert took - imports < 8, f"{took:.1f} s, of which imports {imports:.1f} s"
