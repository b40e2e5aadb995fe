"""scripts/bench.py: a --quick run at tiny sizes, its CSV/Markdown/PNG, failures, memory, fidelity, targets.

The mechanisms below stand in for real ones in a private configs folder, so the run is cheap and
exercises what real mechanisms rarely show on demand: an error, running out of memory, shared QK.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cast.attention.base import Attention
from cast.attention.vanilla import VanillaAttention
from cast.bench.benchmark import (CONFIG_DIR, MATH, SKIPPED, TEXT_MODEL, VANILLA, Shape, Spec, cpu_peak_mb, cpu_peaks,
                            discover, load_attention, parse_options, peak_resettable, slope)
from cast.models import LRAClassifier
from tests.conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bench workers import this module afresh; the environment tells them whose process is the test's.
TEST_PID = int(os.environ.setdefault("BENCH_TEST_PID", str(os.getpid())))
TINY = ["--device", "cpu", "--lengths", "64,128", "--batch", "1", "--heads", "2", "--head-dim", "8", "--repeats", "1",
        "--threads", "1", "--min-time-ms", "5", "--system-malloc"]

import cast.bench.cli as bench


class FailingAttention(VanillaAttention):
    name = "failing"

    def attend(self, q, k, v, mask):
        raise RuntimeError("deliberately broken")


class HungryAttention(VanillaAttention):
    """Runs out of memory at every length, as the CPU allocator reports it."""

    name = "hungry"

    def attend(self, q, k, v, mask):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")


class KilledAttention(VanillaAttention):
    """Dies as under the kernel's OOM killer, but only in a bench worker, never in the test's own process."""

    name = "killed"

    def attend(self, q, k, v, mask):
        if os.getpid() == TEST_PID:
            raise AssertionError("the killed mechanism ran in the test process")
        os.kill(os.getpid(), signal.SIGKILL)


class MeanAttention(Attention):
    """Every query gets the plain mean of the values: far from softmax attention on sharp inputs."""

    name = "mean"

    def attend(self, q, k, v, mask):
        return v.mean(dim=2, keepdim=True).expand_as(v)


class SharedQKAttention(Attention):
    """Reformer's exact attention written out: keys are the normalised queries, no self-attention."""

    name = "sharedqk"

    def __init__(self, d_model, n_heads, dropout=0.0, **kw):
        super().__init__(d_model, n_heads, dropout, shared_qk=True, **kw)

    def attend(self, q, k, v, mask):
        scores = q @ F.normalize(q, dim=-1).transpose(-1, -2) / math.sqrt(q.shape[-1])
        own = torch.eye(q.shape[2], dtype=torch.bool, device=q.device)
        return scores.masked_fill(own | ~mask[:, None, None, :], float("-inf")).softmax(-1) @ v


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("attention")
    shutil.copy(CONFIG_DIR / "vanilla.yaml", folder / "vanilla.yaml")
    for cls in (FailingAttention, HungryAttention, KilledAttention, MeanAttention, SharedQKAttention):
        (folder / f"{cls.name}.yaml").write_text(f"_target_: {__name__}.{cls.__name__}\n_partial_: true\n")
    return folder


@pytest.fixture(scope="module")
def quick_run(configs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", *TINY, "--configs", str(configs), "--out", str(out),
            "--mechanisms", "vanilla,vanilla-math,failing,hungry,killed"]
    assert bench.main(argv) == 0
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_every_row_with_its_status(quick_run):
    rows = read_csv(quick_run / "bench.csv")
    assert set(bench.COLUMNS) <= set(rows[0])
    status = {(r["mode"], r["label"], int(r["length"])): r["status"] for r in rows}
    assert len(status) == len(rows) == 5 * 2
    for length in (64, 128):
        assert status["layer", "vanilla", length] == status["layer", "vanilla-math", length] == "ok"
        assert status["layer", "failing", length] == "error: RuntimeError: deliberately broken"
    assert status["layer", "hungry", 64] == "oom"
    assert status["layer", "hungry", 128].startswith("skipped")
    assert status["layer", "killed", 64] == "oom (killed by signal 9)"
    assert status["layer", "killed", 128].startswith("skipped")
    assert {r["options"] for r in rows if r["label"] == "vanilla-math"} == {"impl=math"}


def test_ratios_are_ratios_to_vanilla_at_the_same_length(quick_run):
    rows = read_csv(quick_run / "bench.csv")
    num = lambda r, key: float(r[key]) if r[key] else None  # noqa: E731
    vanilla = {(r["mode"], r["length"]): r for r in rows if r["label"] == "vanilla"}
    math_rows = {(r["mode"], r["length"]): r for r in rows if r["label"] == "vanilla-math"}
    for r in rows:
        base, baseline = vanilla[r["mode"], r["length"]], math_rows[r["mode"], r["length"]]
        if r["status"] != "ok":
            assert r["time_ms"] == r["time_ratio_vs_vanilla"] == r["speedup_vs_vanilla"] == ""
            continue
        assert num(r, "time_ms") > 0 and num(r, "peak_mem_mb") >= 0
        assert num(r, "time_ratio_vs_vanilla") == pytest.approx(num(r, "time_ms") / num(base, "time_ms"), rel=1e-4)
        assert num(r, "speedup_vs_vanilla") == pytest.approx(num(base, "time_ms") / num(r, "time_ms"), rel=1e-4)
        if num(base, "peak_mem_mb"):
            assert num(r, "mem_ratio_vs_vanilla") == pytest.approx(
                num(r, "peak_mem_mb") / num(base, "peak_mem_mb"), rel=1e-4)
        if num(baseline, "peak_mem_mb"):
            assert num(r, "mem_ratio_vs_math") == pytest.approx(
                num(r, "peak_mem_mb") / num(baseline, "peak_mem_mb"), rel=1e-4)
    assert all(num(r, "time_ratio_vs_vanilla") == 1 for r in vanilla.values())


def test_quick_run_draws_a_valid_png_and_a_markdown_table(quick_run):
    path = quick_run / "bench_layer.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    text = (quick_run / "bench.md").read_text()
    assert "| mechanism | speed 64 | speed 128 | memory 64 (MB) | memory 128 (MB) |" in text
    assert "| failing | error | error |" in text and "| hungry | OOM | skipped |" in text
    assert "duration:" in text and "deliberately broken" in text
    assert "- CPU malloc: the system's default (--system-malloc)" in text
    assert "- layer: batch" in text and "- model:" not in text  # --quick measures the layer only


def test_model_mode_times_a_text_model_training_step_whose_memory_holds_its_gradients(tmp_path):
    argv = ["--mode", "model", *TINY, "--lengths", "32", "--mechanisms", "vanilla", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (row,) = read_csv(tmp_path / "bench.csv")
    assert (row["mode"], row["status"], row["time_ratio_vs_vanilla"]) == ("model", "ok", "1")
    model = LRAClassifier(load_attention(VANILLA), max_length=32, **TEXT_MODEL)
    gradients_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert gradients_mb < float(row["peak_mem_mb"]) < 20 * gradients_mb
    assert (tmp_path / "bench_model.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_worker_killed_mid_run_costs_only_its_job(configs):
    killed, vanilla = Spec("killed"), VANILLA
    jobs = [(killed, 64), (killed, 128), (vanilla, 64)]
    results = cpu_peaks(jobs, "layer", Shape(1, 2, 8), configs, threads=1)
    assert [results[job]["status"] for job in jobs] == ["oom (killed by signal 9)", SKIPPED, "ok"]
    assert results[vanilla, 64]["peak_mem_mb"] >= 0


KEEP_PROBE = """
import sys, torch
from cast.bench.benchmark import _proc_kb, keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest default mmap threshold
before = _proc_kb("VmRSS")
del block
print(kept, (before - _proc_kb("VmRSS")) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or os.uname().sysname != "Linux",
                    reason="glibc and /proc only")
@pytest.mark.parametrize("mode", ["keep", "system"])
def test_timing_keeps_freed_memory_for_reuse_unless_told_otherwise(mode):
    out = subprocess.run([sys.executable, "-c", KEEP_PROBE, mode], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    kept, returned_mb = out[0] == "True", float(out[1])
    if mode == "keep":
        assert kept and returned_mb < 8, "a freed block must stay with the process for the next step"
    else:
        assert returned_mb > 56, "glibc's default hands a freed 64 MiB block back to the OS"


def test_cpu_peak_counts_a_known_allocation_every_time():
    if not peak_resettable():
        pytest.skip("the resident-set peak cannot be reset on this system")

    def allocate_64mb():
        torch.ones(16 * 2**20).add_(1)

    assert [round(cpu_peak_mb(allocate_64mb) / 16) for _ in range(2)] == [4, 4]
    assert cpu_peak_mb(lambda: None) < 2


def test_fidelity_compares_with_exact_and_shared_qk_attention(configs, tmp_path):
    argv = ["--fidelity", *TINY, "--scales", "1,4", "--configs", str(configs), "--out", str(tmp_path),
            "--mechanisms", "vanilla-math,sharedqk,mean,failing"]
    assert bench.main(argv) == 0
    rows = read_csv(tmp_path / "fidelity.csv")
    error = {(r["label"], float(r["input_scale"]), int(r["length"])): r for r in rows}
    assert len(error) == 4 * 2 * 2
    for scale in (1.0, 4.0):
        for n in (64, 128):
            assert float(error["vanilla-math", scale, n]["rel_error"]) < 1e-5
            assert float(error["sharedqk", scale, n]["rel_error"]) < 1e-5
            assert error["sharedqk", scale, n]["reference"].startswith("shared-QK")
            assert error["failing", scale, n]["status"].startswith("error")
        assert float(error["mean", scale, 128]["rel_error"]) > 0.05
    assert float(error["mean", 4.0, 128]["rel_error"]) > float(error["mean", 1.0, 128]["rel_error"])
    assert "| sharedqk |" in (tmp_path / "fidelity.md").read_text()


def test_targets_pass_fail_and_missing():
    rows = [dict(mode="layer", label=label, length=n, time_ms=t, peak_mem_mb=m) for label, n, t, m in [
        ("vanilla", 4096, 600.0, 40.0), ("vanilla-math", 4096, 900.0, 1000.0), ("cast[Nc=64,k=64]", 4096, 100.0, 50.0),
        ("vanilla", 16384, 9000.0, 100.0), ("cast[Nc=128,k=128]", 16384, 1000.0, 90.0)]]
    rows += [dict(mode="layer", label="cast[Nc=32,k=64]", length=n, time_ms=n ** 1.3, peak_mem_mb=1.0)
             for n in bench.SLOPE_LENGTHS]
    bench.add_ratios(rows)
    verdicts = [verdict for verdict, _ in bench.check_targets(rows)]
    # 6x faster, 5% of math, 1.25x vanilla; 9x faster at 16K; slope 1.3.
    assert verdicts == ["PASS", "PASS", "PASS", "FAIL", "FAIL"]
    assert [v for v, _ in bench.check_targets(rows[:3])] == ["PASS", "PASS", "PASS", "MISSING", "MISSING"]
    assert slope([(n, 3 * n) for n in bench.SLOPE_LENGTHS]) == pytest.approx(1.0)


def test_a_run_stopped_part_way_keeps_the_lengths_it_finished(configs, tmp_path, monkeypatch):
    finished = bench.measure_length

    def stop_at_128(args, mode, length, *rest):
        if length == 128:
            raise KeyboardInterrupt
        return finished(args, mode, length, *rest)

    monkeypatch.setattr(bench, "measure_length", stop_at_128)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--mode", "layer", "--configs", str(configs), "--out", str(tmp_path),
                    "--mechanisms", "vanilla,vanilla-math"])
    rows = read_csv(tmp_path / "bench.csv")
    assert sorted((r["label"], int(r["length"])) for r in rows) == [("vanilla", 64), ("vanilla-math", 64)]
    assert float(next(r for r in rows if r["label"] == "vanilla-math")["time_ratio_vs_vanilla"]) > 0


def test_targets_run_measures_exactly_what_the_targets_need():
    args = bench.parse_args(["--targets"])
    plan = bench.measurement_plan(args, discover())
    cast = {n: [s.label for s in specs if s.name == "cast"] for n, specs in plan.items()}
    assert (args.mode, args.device, sorted(plan)) == ("layer", "cpu", [2048, 4096, 8192, 16384])
    assert cast == {2048: ["cast[Nc=32,k=64]"], 4096: ["cast[Nc=64,k=64]", "cast[Nc=32,k=64]"],
                    8192: ["cast[Nc=32,k=64]"], 16384: ["cast[Nc=128,k=128]", "cast[Nc=32,k=64]"]}
    assert [VANILLA, MATH] == plan[4096][:2] and VANILLA in plan[16384] and MATH not in plan[16384]


def test_options_labels_and_lengths_parse():
    assert parse_options("Nc=64,k=64") == {"num_clusters": 64, "cluster_size": 64}
    assert parse_options("κ=auto,clustering=sa_topk") == {"cluster_size": "auto", "clustering": "sa_topk"}
    with pytest.raises(ValueError, match="--cast 'Nc64'.*NAME=VALUE"):
        parse_options("Nc64")
    a, b = Spec.make("cast", {"cluster_size": 64, "num_clusters": 32}), Spec.make("cast", parse_options("Nc=32,k=64"))
    assert a == b and a.label == "cast[Nc=32,k=64]" and a.options_str == "num_clusters=32,cluster_size=64"
    assert bench.parse_list("1K,2K,512") == [512, 1024, 2048]


def test_discovery_finds_every_config_and_options_override_them():
    specs = discover()
    assert specs[:2] == [VANILLA, MATH] and MATH.label == "vanilla-math"
    assert {s.name for s in specs} == {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert load_attention(MATH).keywords["impl"] == "math"
    if (CONFIG_DIR / "cast.yaml").exists():  # reads a top-level key it must fall back from
        assert load_attention(Spec.make("cast", {"num_clusters": 8})).keywords["num_clusters"] == 8
        assert isinstance(load_attention(Spec("cast")).keywords["num_clusters"], int)


def test_unknown_mechanism_is_refused_with_the_choices(tmp_path, capsys):
    assert bench.main(["--quick", "--mechanisms", "nonesuch", "--out", str(tmp_path)]) == 2
    assert "nonesuch" in capsys.readouterr().err
