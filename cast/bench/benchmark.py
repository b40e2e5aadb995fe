"""Measuring core of scripts/bench.py: one training step of an attention layer or of the LRA Text
model, its time and its peak memory (the output error against exact attention is in
:mod:`cast.bench.fidelity`, the tables and plot in :mod:`cast.bench.report`).

Shapes: B batch, h heads, N length, d head width, D = h*d (layer mode). Model mode is the LRA
Text protocol: 4 layers, 4 heads, D = 256, MLP 1024, 257 byte tokens, 2 classes, CLS pooling.

A step is forward + backward (model mode: + AdamW update); it ends by setting gradients to None,
so every step allocates its own gradients and nothing of the last step is held between steps.

Peak memory of a step = the most memory in use during the step minus what was in use just before
it (parameters, inputs, optimizer state), measured after one warm-up step:
- CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats (the tensors
  the caching allocator hands out).
- CPU: the process's resident set. glibc's malloc_trim first hands freed heap pages back to the
  OS (so reused pages are counted again), writing 5 to /proc/self/clear_refs resets the peak
  (VmHWM, Linux >= 4.0), and the peak after the step minus the resident set before it is the
  answer. The worker runs with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB: every tensor
  larger than that gets pages of its own that return to the OS when it is freed, so the resident
  set follows the live tensors (by default the threshold grows with the largest block freed, and
  heap fragmentation then added tens of MB that differed between runs of the same step). The
  measurements run in a subprocess (``python -m cast.bench.benchmark``, one per mode, a
  fresh one after a crash) whose address space is capped near the memory available at its
  start: running out of memory becomes an error reported as ``oom`` rather than a visit from the
  OOM killer, and the benchmark's own process never holds a mechanism's peak. Where the peak
  cannot be reset (no /proc, e.g. macOS), each (mechanism, length) gets its own process and the
  answer is ru_maxrss after the step minus ru_maxrss before it, without warm-up (less precise:
  import-time peaks hide small steps).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cast.app.memory import peak_memory_mb
from cast.app.registry import BASELINE
from cast.app.paths import CONFIG_DIR as CONFIG_ROOT
from cast.models import LRAClassifier

CONFIG_DIR = CONFIG_ROOT / "attention"
TEXT_MODEL = dict(vocab_size=257, num_classes=2, d_model=256, qkv_dim=256, n_layers=4, n_heads=4,
                  mlp_dim=1024, dropout=0.1, attention_dropout=0.1, positions="sinusoidal", pooling="cls")
# Short names accepted on the command line (CAST's Nc and κ) and shown in labels.
ALIASES = {"Nc": "num_clusters", "k": "cluster_size", "κ": "cluster_size"}
SHORT = {"num_clusters": "Nc", "cluster_size": "k"}
RESULT = "BENCH-RESULT "
CLEAR_REFS = Path("/proc/self/clear_refs")
SKIPPED = "skipped: out of memory at a shorter length"
MMAP_THRESHOLD = str(128 * 1024)  # bytes; the workers' MALLOC_MMAP_THRESHOLD_ (module docstring)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@dataclass(frozen=True)
class Spec:
    """A mechanism to measure: its config name in the configs folder and options overriding it."""

    name: str
    options: tuple = ()

    @classmethod
    def make(cls, name: str, options: dict | None = None) -> Spec:
        order = list(SHORT)
        items = sorted((options or {}).items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 2, kv[0]))
        return cls(name, tuple(items))

    @property
    def label(self) -> str:
        if self == MATH:
            return "vanilla-math"
        opts = ",".join(f"{SHORT.get(k, k)}={v}" for k, v in self.options)
        return f"{self.name}[{opts}]" if opts else self.name

    @property
    def options_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options)


VANILLA = Spec(BASELINE)
MATH = Spec("vanilla", (("impl", "math"),))


def parse_options(text: str, flag: str = "--cast") -> dict:
    """'Nc=64,k=64' -> {'num_clusters': 64, 'cluster_size': 64}; values are read as YAML."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {text!r}: each option is NAME=VALUE, e.g. {flag} Nc=64,k=64")
        options[ALIASES.get(key.strip(), key.strip())] = yaml.safe_load(value)
    return options


def discover(config_dir: Path = CONFIG_DIR) -> list[Spec]:
    """Every configs/attention/*.yaml with its own defaults, vanilla first, then vanilla-math."""
    names = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
    if "vanilla" not in names:
        raise FileNotFoundError(f"{config_dir}/vanilla.yaml is missing: every ratio is relative to vanilla")
    return [VANILLA, MATH] + [Spec(n) for n in names if n != "vanilla"]


def load_attention(spec: Spec, config_dir: Path = CONFIG_DIR) -> Callable:
    """The mechanism's Hydra partial, taking (d_model, n_heads, dropout, qkv_dim)."""
    path = Path(config_dir) / f"{spec.name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such attention config; available: "
                                f"{sorted(p.stem for p in Path(config_dir).glob('*.yaml'))}")
    # Configs may read top-level keys (cast.yaml: ${oc.select:num_clusters,32}); wrapping the
    # file in a root lets them fall back to their defaults, and options replace them outright.
    root = OmegaConf.create({"attention": OmegaConf.load(path)})
    for key, value in spec.options:
        root.attention[key] = value
    return instantiate(root.attention)


@dataclass(frozen=True)
class Shape:
    batch: int = 4
    heads: int = 4
    head_dim: int = 32


def build_step(spec: Spec, mode: str, length: int, shape: Shape, device: str,
               config_dir: Path = CONFIG_DIR, seed: int = 0) -> Callable[[], None]:
    """A closure running one training step of ``spec`` at ``length`` on fixed random inputs."""
    torch.manual_seed(seed)
    attention = load_attention(spec, config_dir)
    b = shape.batch
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    if mode == "layer":
        d_model = shape.heads * shape.head_dim
        layer = attention(d_model=d_model, n_heads=shape.heads, dropout=0.0, qkv_dim=d_model).to(device).train()
        x = torch.randn(b, length, d_model, device=device, requires_grad=True)
        grad = torch.randn(b, length, d_model, device=device)

        def step() -> None:
            layer(x, mask).backward(grad)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        return step
    if mode != "model":
        raise ValueError(f"bench mode {mode!r} is not one of ('layer', 'model')")
    model = LRAClassifier(attention, max_length=length, **TEXT_MODEL).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(1, TEXT_MODEL["vocab_size"], (b, length), device=device)
    labels = torch.randint(0, TEXT_MODEL["num_classes"], (b,), device=device)

    def step() -> None:
        F.cross_entropy(model({"input_ids": ids, "mask": mask}), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], iters: int, device: str) -> float:
    """Mean wall time of ``iters`` consecutive steps, in milliseconds."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) * 1000 / iters


def cuda_peak_mb(step: Callable[[], None], device: str) -> float:
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def peak_resettable() -> bool:
    return os.access(CLEAR_REFS, os.W_OK)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse, as a caching allocator does (PyTorch's on
    CUDA; jemalloc or tcmalloc on a CPU); True when it took effect.

    By default glibc hands every block above its mmap threshold (at most 32 MiB) back to the OS
    when it is freed and trims the heap's free top, so a step that allocates tensors of tens of
    MB page-faults them in anew on every step. Timing then measures the kernel's page zeroing as
    much as the mechanism: CAST's 16K layer step (Nc = κ = 128) on 2 cores took 0.89 s that way
    and 0.62 s with freed memory kept (vanilla 8.7 s either way). Used for timing only; peak
    memory is measured in the worker processes with their own setting (module docstring).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # The largest thresholds mallopt takes (an int). At 2**30 the materialised baseline's
        # 1 GiB scores at 4K were mmap-ed afresh each step: 1.7 to 5.5 s per step instead of 2.5.
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(2**31 - 1))
                    and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): its allocator's own behaviour is measured


def cpu_peak_mb(step: Callable[[], None]) -> float:
    """Peak resident-set growth during one step (see the module docstring)."""
    if not peak_resettable():
        before = peak_memory_mb()
        step()
        return peak_memory_mb() - before
    step()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed pages may stay resident, so reused memory is undercounted
    CLEAR_REFS.write_text("5")
    before = _proc_kb("VmRSS")
    step()
    return (_proc_kb("VmHWM") - before) / 1024


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def failure(exc: BaseException) -> str:
    """The status recorded for a measurement that raised."""
    if is_oom(exc):
        return "oom"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"error: {type(exc).__name__}: {first}"


def cpu_peaks(jobs: list[tuple[Spec, int]], mode: str, shape: Shape, config_dir: Path = CONFIG_DIR,
              seed: int = 0, threads: int | None = None) -> dict[tuple[Spec, int], dict]:
    """CPU peak memory of each (mechanism, length) job, measured in subprocesses.

    Jobs run in the order given, so list each mechanism's lengths in ascending order: after one
    runs out of memory its longer lengths are skipped. A worker that dies (the OOM killer's
    SIGKILL) costs only the job it was running; a fresh worker takes the rest.
    Returns {(spec, length): {"status": ..., "peak_mem_mb": ...}}.
    """
    payload = dict(mode=mode, batch=shape.batch, heads=shape.heads, head_dim=shape.head_dim,
                   config_dir=str(config_dir), seed=seed, threads=threads or torch.get_num_threads())
    results: dict[tuple[Spec, int], dict] = {}
    pending = list(jobs)
    while pending:
        batch = pending if peak_resettable() else pending[:1]
        payload["jobs"] = [(spec.name, dict(spec.options), length) for spec, length in batch]
        # stderr goes to a file: a pipe nobody reads while stdout is read line by line can fill and stall the worker.
        with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
                [sys.executable, "-m", "cast.bench.benchmark", json.dumps(payload)], stdout=subprocess.PIPE, stderr=err,
                text=True, env={"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, **os.environ}) as proc:
            for line in proc.stdout:
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT):])
                    job = batch[result.pop("job")]
                    results[job] = result
                    print(f"  {mode} {job[0].label} at {job[1]}: "
                          + (f"{result['peak_mem_mb']:.1f} MB" if "peak_mem_mb" in result else result["status"]), flush=True)
            proc.wait()
            err.seek(0)
            reason = (err.read().strip().splitlines() or ["no output"])[-1][:300]
        pending = [job for job in pending if job not in results]
        if pending and pending[0] in batch:
            # The worker died on this job; a negative code is a signal, SIGKILL almost always the OOM killer.
            results[pending.pop(0)] = {"status": f"oom (killed by signal {-proc.returncode})" if proc.returncode < 0
                                       else f"error: worker exited with {proc.returncode}: {reason}"}
        out_of_memory = {spec for (spec, _), r in results.items() if r["status"].startswith("oom")}
        results.update({job: {"status": SKIPPED} for job in pending if job[0] in out_of_memory})
        pending = [job for job in pending if job not in results]
    return results


def _cap_address_space() -> None:
    """Make allocations past the memory available now fail with an error (Linux only)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return
    available_kb = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    limit = (_proc_kb("VmSize") + available_kb) * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def worker(payload: dict) -> None:
    """Subprocess side of :func:`cpu_peaks`: one result line per job on stdout."""
    _cap_address_space()
    torch.set_num_threads(payload["threads"])
    shape = Shape(payload["batch"], payload["heads"], payload["head_dim"])
    out_of_memory = set()
    for i, (name, options, length) in enumerate(payload["jobs"]):
        spec = Spec.make(name, options)
        result = {"status": SKIPPED}
        if spec not in out_of_memory:
            try:
                step = build_step(spec, payload["mode"], length, shape, "cpu", Path(payload["config_dir"]),
                                  payload["seed"])
                result = {"status": "ok", "peak_mem_mb": cpu_peak_mb(step)}
            except Exception as exc:
                result = {"status": failure(exc)}
            step = None  # free this job's tensors before the next job's baseline
            gc.collect()
        if result["status"] == "oom":
            out_of_memory.add(spec)
        print(RESULT + json.dumps({"job": i, **result}), flush=True)


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(value) against log(length), over the positive values."""
    points = [(x, y) for x, y in points if y and y > 0]
    if len(points) < 2:
        return None
    return float(np.polyfit(np.log([x for x, _ in points]), np.log([y for _, y in points]), 1)[0])


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
