"""scripts/report.py: tables from real sweeps and from hand-made results, failures, the W&B leaderboard."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from cast.app.results import write_results
from tests.conftest import ROOT, TINY
from tests.wandb_records import tables, wait_for_exit
from tests.wandb_records import summary as wandb_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

import cast.app.report as report
import cast.app.reporting as reporting


def fake_run(run_dir: Path, task: str, attention: str, seed: int, acc: float | None, status: str = "ok",
             choice: str | None = None, **options) -> Path:
    """A results.json as train() writes it (and, with choice, the task's Hydra config name)."""
    write_results(run_dir, {
        "task": task, "attention": attention, "attention_options": options, "seed": seed,
        "val_acc_best": acc, "test_acc": acc, "params": 10, "steps": 6, "wall_time_s": 1.0,
        "samples_per_s": 5.0, "peak_mem_mb": 1.0, "status": status,
        **({"error": "RuntimeError: out of memory"} if status == "failed" else {}),
    })
    if choice:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save({"hydra": {"runtime": {"choices": {"task": choice}}}}, run_dir / ".hydra" / "hydra.yaml")
    return run_dir


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row[next(iter(row))]: row for row in csv.DictReader(f)}


def test_cluster_table_and_plot_from_cast_runs(tmp_path):
    accs = {}
    for task, base in (("listops", 0.3), ("image", 0.4)):
        for nc in (8, 16, 32):
            for seed in (0, 1):
                accs[task, nc, seed] = base + nc / 1000 + seed / 100
                fake_run(tmp_path / f"{task}-{nc}-{seed}", task, "cast", seed, accs[task, nc, seed], num_clusters=nc)
    assert report.main([str(tmp_path), "--wandb"]) == 0
    out = tmp_path / "report"
    (wandb_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert {t["key"] for t in tables(wandb_file)} == {"leaderboard", "clusters"}
    assert wandb_summary(wandb_file)["clusters_plot/_type"] == "image-file"
    png = (out / "clusters.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(out / "clusters.png") as image:
        image.verify()
    rows = read_csv(out / "clusters.csv")
    assert list(rows) == ["ListOps", "Image"]
    for task, name in (("listops", "ListOps"), ("image", "Image")):
        for nc in (8, 16, 32):
            values = [100 * accs[task, nc, s] for s in (0, 1)]
            assert float(rows[name][f"{nc}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(rows[name][f"{nc}_std"]) == pytest.approx(statistics.stdev(values))
            assert rows[name][f"{nc}_n"] == "2"
    # The best cluster count is marked per task (row), not across tasks.
    clusters = (out / "report.md").read_text().split("by number of clusters")[1]
    assert "| ListOps | 31.30 ± 0.71 | 32.10 ± 0.71 | **33.70** ± 0.71 | 0,1 |" in clusters
    assert "| Image | 41.30 ± 0.71 | 42.10 ± 0.71 | **43.70** ± 0.71 | 0,1 |" in clusters


def test_lra_layout_average_pathx_and_variants(tmp_path):
    tasks = ("listops", "text", "retrieval", "image", "pathfinder")
    for i, task in enumerate(tasks):
        fake_run(tmp_path / f"v-{task}", task, "vanilla", 0, 0.5 + i / 100, impl="fused")
        fake_run(tmp_path / f"c-{task}", task, "cast", 0, 0.6, clustering="topk")
    fake_run(tmp_path / "c-sa", "listops", "cast", 0, 0.7, clustering="sa_topk")
    fake_run(tmp_path / "c-px", "pathfinder", "cast", 0, 0.55, choice="pathx", clustering="topk")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out" / "lra.csv")
    assert list(rows)[:3] == ["vanilla", "cast (clustering=sa_topk)", "cast (clustering=topk)"]
    assert float(rows["vanilla"]["avg_mean"]) == pytest.approx(52.0)
    assert rows["cast (clustering=sa_topk)"]["avg_mean"] == ""  # ListOps only: no five-task average
    assert float(rows["cast (clustering=topk)"]["pathx_mean"]) == pytest.approx(55.0)
    assert float(rows["cast (clustering=topk)"]["pathfinder_mean"]) == pytest.approx(60.0)
    assert float(rows["cast (clustering=topk)"]["avg_mean"]) == pytest.approx(60.0)  # Path-X is not averaged
    assert float(rows["Transformer (reported)"]["listops_mean"]) == 36.37
    assert rows["Transformer (reported)"]["source"] == "reported"
    tex = (tmp_path / "out" / "lra.tex").read_text()
    assert "cast (clustering=sa\\_topk) & \\textbf{70.00}" in tex
    assert "Path-X" in tex and "\\emph{Transformer (reported)}" in tex


def test_failed_and_running_runs_are_listed_apart_not_tabled(tmp_path):
    fake_run(tmp_path / "ok", "listops", "cast", 0, 0.4)
    fake_run(tmp_path / "failed", "listops", "cast", 1, None, status="failed", clustering="topk")
    fake_run(tmp_path / "running", "text", "cast", 0, None, status="running")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    table, unfinished = md.split("## Failed or unfinished runs")
    assert "| cast | **40.00** | - | - | - | - | - | 0 |" in table  # its settings name no failed run's
    assert "failed" not in table.split("\n", 3)[3] and "running" not in table
    assert "| listops | cast (clustering=topk) | 1 | failed |" in unfinished
    assert "RuntimeError: out of memory" in unfinished and "| running |" in unfinished
    assert "unreadable results.json" in unfinished
    statuses = sorted(r["status"] for r in csv.DictReader(open(tmp_path / "report" / "runs.csv")))
    assert statuses == ["failed", "failed", "ok", "running"]


def test_no_runs_is_an_error_that_names_the_directory(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_a_failed_cluster_count_is_no_column_and_the_axis_counts_in_powers_of_two(tmp_path):
    for nc in (4, 8, 16, 64):
        fake_run(tmp_path / f"nc{nc}", "listops", "cast", 0, 0.3 + nc / 1000, num_clusters=nc)
    fake_run(tmp_path / "nc0", "listops", "cast", 0, None, status="failed", num_clusters=0)
    runs = reporting.collect([tmp_path])
    table = reporting.cluster_table(runs)
    assert table.keys == ["4", "8", "16", "64"]
    fig = report.cluster_figure(table, "test_acc")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    shown = [t.get_text() for t in ax.get_xticklabels() if ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert shown == ["4", "8", "16", "64"]
    assert ax.get_xlim()[0] > 2  # no point at 0 squeezing the real ones to the right
    assert report.main([str(tmp_path)]) == 0
    assert list(read_csv(tmp_path / "report" / "clusters.csv")["ListOps"])[1:3] == ["source", "4_mean"]


@pytest.fixture(scope="module")
def sweep(listops_dir, tmp_path_factory) -> Path:
    """A real 2 (layers) × 2 (seeds) multirun, plus two jobs that fail (pooling=median is invalid)."""
    out = tmp_path_factory.mktemp("sweep")
    done = subprocess.run(
        [sys.executable, "train.py", "-m", *TINY, f"task.data_dir={listops_dir}", "attention=vanilla",
         "model.n_layers=1,2", "seed=0,1", "model.pooling=cls,median", f"hydra.sweep.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_report_of_a_real_sweep_matches_its_results_files(sweep, tmp_path):
    done = subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--out", str(tmp_path), "--metric",
                           "val_acc_best"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(results) == 8
    rows = read_csv(tmp_path / "lra.csv")
    for layers in (1, 2):
        ok = [r for r in results if r["status"] == "ok" and f"model.n_layers={layers}" in _overrides(r)]
        assert len(ok) == 2
        values = [100 * r["val_acc_best"] for r in ok]
        row = rows[f"vanilla (model.n_layers={layers})"]  # pooling varies among failed runs only
        assert float(row["listops_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert float(row["listops_std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
        assert row["seeds"] == "0 1"
        assert row["listops_n"] == "2"
    # Two models, the majority class, seven reported rows: the failed settings make no row.
    assert len(rows) == 2 + 1 + 7
    majority = {r["test_majority_acc"] for r in results if r["status"] == "ok"}
    assert len(majority) == 1 and float(rows["majority class"]["listops_mean"]) == pytest.approx(100 * majority.pop())
    assert rows["majority class"]["source"] == "data"
    times = read_csv(tmp_path / "time.csv")
    for layers in (1, 2):
        ok = [r for r in results if r["status"] == "ok" and f"model.n_layers={layers}" in _overrides(r)]
        minutes = [r["wall_time_s"] / 60 for r in ok]
        assert float(times[f"vanilla (model.n_layers={layers})"]["listops_mean"]) == pytest.approx(
            statistics.fmean(minutes), abs=1e-9)
    md = (tmp_path / "report.md").read_text()
    table, listed = md.split("## Failed or unfinished runs")
    assert "pooling=median" not in table and "model.pooling=median" in listed
    assert listed.count("| failed |") == 4 and listed.count("pooling='median' must be one of") == 4
    assert "8 runs: 4 finished, 4 failed or unfinished." in md
    assert "failed or unfinished runs:" in done.stdout


def _overrides(results: dict) -> list[str]:
    return OmegaConf.load(Path(results["run_dir"]) / ".hydra" / "overrides.yaml")


@pytest.mark.slow
def test_wandb_leaderboard_is_written_offline(sweep, tmp_path):
    assert report.main([str(sweep), "--out", str(tmp_path), "--wandb", "--wandb-project", "lra-test"]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("run-*.wandb"))
    (header,) = [r.run for r in wait_for_exit(wandb_file) if r.WhichOneof("record_type") == "run"]
    assert header.project == "lra-test" and header.job_type == "report"
    logged = {t["key"]: t for t in tables(wandb_file)}
    assert set(logged) == {"leaderboard"}  # no cast runs here, so no cluster table or plot
    board = logged["leaderboard"]
    assert board["_type"] == "table-file" and board["path"].startswith("media/table/leaderboard_")
    payload = json.loads((runs[0] / "files" / board["path"]).read_text())
    assert payload["columns"][:4] == ["model", "source", "ListOps", "ListOps std"]
    assert payload["columns"][-3:] == ["Avg", "Avg std", "seeds"]
    # Two models, the majority class (from the data), seven reported rows.
    assert board["nrows"] == len(payload["data"]) == 2 + 1 + 7
    sources = [dict(zip(payload["columns"], line))["source"] for line in payload["data"]]
    assert sources == ["runs"] * 2 + ["data"] + ["reported"] * 7
    expected = read_csv(tmp_path / "lra.csv")
    for line in payload["data"]:
        row = dict(zip(payload["columns"], line))
        mean = expected[row["model"]]["listops_mean"]
        assert row["ListOps"] == (float(mean) if mean else None)
    assert "vanilla (model.n_layers=2)" in [line[0] for line in payload["data"]]
