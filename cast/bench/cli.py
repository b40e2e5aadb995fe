"""Speed and memory of every attention mechanism against sequence length, as ratios to vanilla.

    python scripts/bench.py --quick                      # 256..1K, attention layer, 1 repeat
    python scripts/bench.py                              # 1K..16K, layer and Text model, 5 repeats
    python scripts/bench.py --cast Nc=64,k=64 --variant performer:num_features=128
    python scripts/bench.py --targets                    # only what CAST's targets need (CPU)
    python scripts/bench.py --fidelity                   # output error against exact attention
    python scripts/bench.py --peers                      # against reference implementations (cast/bench/peers.py)

Measured: every configs/attention/*.yaml with its defaults, ``vanilla-math`` (impl=math, the N x N
baseline of LRA-era ratios) and the --cast / --variant variants, as one attention layer (``layer``)
or one training step of the LRA Text model (``model``). Timing runs in this process: per length
all mechanisms are warmed up, then each repeat times them in turn, the order rotating, so a shared
machine's drifts hit all alike; medians over repeats, ratios of medians to vanilla (fused) at the
same length. Peak memory: cast/benchmark.py. A failure is recorded and the run goes on; a
mechanism out of memory is skipped at longer lengths. Outputs in --out: bench.csv (rewritten
after every length, so a stopped run keeps what it measured), bench.md (the LRA efficiency
table's layout), bench_<mode>.png (log-log, fitted slopes); --fidelity writes fidelity.csv and
fidelity.md instead.
Shapes (layer mode): B batch (--batch), h heads (--heads), d head width (--head-dim), N length.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path


import torch

from cast.app.preflight import busy_cpu_message
from cast.bench.report import fidelity_markdown, header, plot, speed_markdown, write_csv
from cast.bench.benchmark import (CONFIG_DIR, MATH, SKIPPED, VANILLA, Shape, Spec, build_step,
                            cpu_peaks, cuda_peak_mb, discover, failure, keep_freed_memory, parse_options,
                            slope, time_ms)
from cast.bench.fidelity import fidelity_rows
from cast.bench.peers import PEER_LENGTHS, peer_rows, peers_markdown
from cast.bench.peers import COLUMNS as PEER_COLUMNS

COLUMNS = ["mode", "device", "mechanism", "options", "label", "length", "batch", "time_ms",
           "time_ratio_vs_vanilla", "speedup_vs_vanilla", "peak_mem_mb", "mem_ratio_vs_vanilla",
           "mem_ratio_vs_math", "time_ms_min", "time_ms_max", "repeats", "iters", "status"]
FIDELITY_COLUMNS = ["device", "mechanism", "options", "label", "length", "batch", "heads", "head_dim",
                    "input_scale", "rel_error", "reference", "status"]
FULL_LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [256, 512, 1024]
CAST_4K = Spec.make("cast", {"num_clusters": 64, "cluster_size": 64})
CAST_16K = Spec.make("cast", {"num_clusters": 128, "cluster_size": 128})
CAST_SLOPE = Spec.make("cast", {"num_clusters": 32, "cluster_size": 64})
SLOPE_LENGTHS = [2048, 4096, 8192, 16384]


def parse_list(text: str, kind=int) -> list:
    """'1K,2K,4096' -> [1024, 2048, 4096] (K = 1024); '1,4' -> [1.0, 4.0] with kind=float."""
    try:
        return sorted({kind(float(t[:-1]) * 1024) if t[-1:] in "kK" else kind(t) for t in text.split(",") if t})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers such as 1K,2K,4096") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["layer", "model", "both"], help="default: both (--quick, --targets: layer)")
    p.add_argument("--lengths", type=parse_list, help="default 1K,2K,4K,8K,16K (--quick: 256,512,1K)")
    p.add_argument("--batch", type=int, default=4, help="batch size of both modes (default 4)")
    p.add_argument("--heads", type=int, default=4, help="layer mode: heads (default 4)")
    p.add_argument("--head-dim", type=int, default=32, help="layer mode: head width (default 32)")
    p.add_argument("--repeats", type=int, help="timed rounds over all mechanisms (default 5, --quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per mechanism and length, besides one that "
                   "sizes the repeats (default 2, --quick 1)")
    p.add_argument("--min-time-ms", type=float, default=100.0, help="least time of one mechanism in one repeat")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available; --targets: cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; --quick: 1)")
    p.add_argument("--mechanisms", help="comma-separated labels to keep, e.g. vanilla-math,cast (vanilla is kept)")
    p.add_argument("--cast", action="append", default=[], metavar="OPTS", help="a CAST variant, e.g. Nc=64,k=64")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OPTS", help="e.g. reformer:n_hashes=1")
    p.add_argument("--configs", type=Path, default=CONFIG_DIR, help="folder of attention YAMLs")
    p.add_argument("--out", type=Path, help="output folder (default outputs/bench/<timestamp>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: time with glibc's default malloc, which unmaps and page-faults large blocks "
                   "anew every step (default: freed memory is kept, as a caching allocator does)")
    p.add_argument("--quick", action="store_true", help="256,512,1K, 1 repeat, layer mode, 1 thread")
    p.add_argument("--targets", action="store_true", help="only the measurements CAST's targets need")
    p.add_argument("--fidelity", action="store_true", help="output error against exact attention instead")
    p.add_argument("--peers", action="store_true", help="each mechanism against its reference implementation "
                   "where that package is installed (default lengths 1K,4K,16K; --mechanisms picks pairs)")
    p.add_argument("--scales", type=lambda t: parse_list(t, float), default=[1.0, 4.0],
                   help="--fidelity: input standard deviations (larger = sharper attention)")
    args = p.parse_args(argv)
    args.argv = argv
    if (args.targets or args.peers) and args.mode not in (None, "layer"):
        p.error("--targets and --peers measure the attention layer only; drop --mode")
    args.mode = args.mode or ("layer" if args.quick or args.targets or args.peers else "both")
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else PEER_LENGTHS if args.peers else FULL_LENGTHS)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.warmup = max(1, args.warmup if args.warmup is not None else 1 if args.quick else 2)
    args.device = args.device or ("cpu" if args.targets or not torch.cuda.is_available() else "cuda")
    # Threads of one op wait for each other; on a busy machine that costs more than they gain.
    args.threads = args.threads or (1 if args.quick else None)
    return args


def chosen_specs(args) -> list[Spec]:
    specs = discover(args.configs)
    if args.mechanisms:
        keep = set(args.mechanisms.split(",")) | {"vanilla"}
        if unknown := keep - {s.label for s in specs}:
            raise ValueError(f"--mechanisms: {sorted(unknown)} not in {args.configs}; "
                             f"choose from {[s.label for s in specs]}")
        specs = [s for s in specs if s.label in keep]
    variants = [("cast", opts, "--cast") for opts in args.cast]
    variants += [(*v.partition(":")[::2], "--variant") for v in args.variant]
    for name, opts, flag in variants:
        spec = Spec.make(name, parse_options(opts, flag))
        specs += [spec] if spec not in specs else []
    return specs


def measurement_plan(args, specs: list[Spec]) -> dict[int, list[Spec]]:
    """The mechanisms to measure at each length: all of them, or just what the targets need."""
    if not args.targets:
        return {n: specs for n in args.lengths}
    return {n: [CAST_SLOPE] for n in SLOPE_LENGTHS} | {4096: [VANILLA, MATH, CAST_4K, CAST_SLOPE],
                                                       16384: [VANILLA, CAST_16K, CAST_SLOPE]}


def measure(args, plan: dict[int, list[Spec]], save=lambda rows: None) -> list[dict]:
    """Every (mode, length) of the plan; ``save(rows)`` after each, so a stopped run keeps its rows."""
    shape = Shape(args.batch, args.heads, args.head_dim)
    rows = []
    for mode in ["layer", "model"] if args.mode == "both" else [args.mode]:
        memory = {}
        if args.device == "cpu":
            print(f"[{mode}] peak memory, in a subprocess", flush=True)
            jobs = [(spec, n) for spec in dict.fromkeys(s for n in plan for s in plan[n])
                    for n in sorted(plan) if spec in plan[n]]
            memory = cpu_peaks(jobs, mode, shape, args.configs, args.seed, args.threads)
        out_of_memory: set[Spec] = set()
        for length in sorted(plan):
            rows += measure_length(args, mode, length, plan[length], shape, memory, out_of_memory)
            save(rows)
    return rows


def measure_length(args, mode, length, specs, shape, memory, out_of_memory) -> list[dict]:
    """Build and warm up every mechanism at one length, then time them round-robin."""
    device, rows, steps = args.device, {}, {}

    def fail(spec, exc):
        rows[spec]["status"] = failure(exc)
        steps.pop(spec, None)
        out_of_memory.update([spec] if rows[spec]["status"] == "oom" else [])

    for spec in specs:
        row = rows[spec] = dict(mode=mode, device=device, mechanism=spec.name, options=spec.options_str,
                                label=spec.label, length=length, batch=args.batch, status="ok")
        row.update(memory.get((spec, length), {}) if spec not in out_of_memory else {"status": SKIPPED})
        if row["status"] != "ok":
            out_of_memory.update([spec] if row["status"].startswith(("oom", "skipped")) else [])
            continue
        try:
            steps[spec] = build_step(spec, mode, length, shape, device, args.configs, args.seed)
            time_ms(steps[spec], args.warmup, device)
            row["iters"] = max(1, min(100, math.ceil(args.min_time_ms / max(time_ms(steps[spec], 1, device), 1e-3))))
            if device != "cpu":
                row["peak_mem_mb"] = cuda_peak_mb(steps[spec], device)
        except Exception as exc:
            fail(spec, exc)
    times, order = {spec: [] for spec in steps}, list(steps)
    for repeat in range(args.repeats):
        shift = repeat % max(1, len(order))
        for spec in order[shift:] + order[:shift]:
            if spec not in steps:
                continue
            try:
                # One untimed step first: the one before belonged to another mechanism, whose
                # freed memory and evicted caches this one's first step would pay for.
                steps[spec]()
                times[spec].append(time_ms(steps[spec], rows[spec]["iters"], device))
            except Exception as exc:
                fail(spec, exc)
    for spec, ts in times.items():
        if rows[spec]["status"] == "ok":
            rows[spec].update(time_ms=statistics.median(ts), time_ms_min=min(ts), time_ms_max=max(ts), repeats=len(ts))
    steps.clear()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"[{mode} {length}] " + ", ".join(f"{r['label']} " + (f"{r['time_ms']:.1f} ms" if "time_ms" in r
                                                                else r["status"]) for r in rows.values()), flush=True)
    return list(rows.values())


def ratio(a, b):
    return a / b if a is not None and b else None


def add_ratios(rows: list[dict]) -> None:
    """Ratios against vanilla (fused) and vanilla-math of the same mode and length."""
    index = {(r["mode"], r["length"], r["label"]): r for r in rows}
    for r in rows:
        vanilla = index.get((r["mode"], r["length"], VANILLA.label), {})
        baseline = index.get((r["mode"], r["length"], MATH.label), {})
        r["time_ratio_vs_vanilla"] = ratio(r.get("time_ms"), vanilla.get("time_ms"))
        r["speedup_vs_vanilla"] = ratio(vanilla.get("time_ms"), r.get("time_ms"))
        r["mem_ratio_vs_vanilla"] = ratio(r.get("peak_mem_mb"), vanilla.get("peak_mem_mb"))
        r["mem_ratio_vs_math"] = ratio(r.get("peak_mem_mb"), baseline.get("peak_mem_mb"))


def check_targets(rows: list[dict]) -> list[tuple[str, str]]:
    """CAST's targets on the attention layer as (PASS | FAIL | MISSING, line)."""
    layer = {(r["label"], r["length"]): r for r in rows if r["mode"] == "layer"}

    def get(spec, n, key):
        return layer.get((spec.label, n), {}).get(key)

    times = [(n, get(CAST_SLOPE, n, "time_ms")) for n in SLOPE_LENGTHS]
    checks = [
        (f"{CAST_4K.label} at 4K: speed-up over fused vanilla", get(CAST_4K, 4096, "speedup_vs_vanilla"), ">=", 5),
        (f"{CAST_4K.label} at 4K: peak memory / vanilla-math", get(CAST_4K, 4096, "mem_ratio_vs_math"), "<=", 0.10),
        (f"{CAST_4K.label} at 4K: peak memory / fused vanilla", get(CAST_4K, 4096, "mem_ratio_vs_vanilla"), "<=", 1.5),
        (f"{CAST_16K.label} at 16K: speed-up over fused vanilla", get(CAST_16K, 16384, "speedup_vs_vanilla"), ">=", 10),
        (f"{CAST_SLOPE.label}: log-log slope of time over 2K-16K",
         slope(times) if all(t for _, t in times) else None, "<=", 1.15),
    ]
    out = []
    for text, value, op, limit in checks:
        if value is None:
            out.append(("MISSING", f"MISSING {text}: not measured (scripts/bench.py --targets measures it)"))
            continue
        verdict = "PASS" if (value >= limit if op == ">=" else value <= limit) else "FAIL"
        out.append((verdict, f"{verdict} {text} = {value:.3g} (target {op} {limit})"))
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.kept_memory = (args.device == "cpu" and not args.fidelity and not args.system_malloc
                        and keep_freed_memory())  # only timing needs it
    busy = busy_cpu_message("times will be noisy; --threads 1 and more --repeats help")
    if args.device == "cpu" and not args.fidelity and busy:
        print(f"bench: {busy}", flush=True)
    out = args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.peers:
        try:
            rows = peer_rows(args)
        except ValueError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "peers.csv", rows, PEER_COLUMNS)
        title = "Mechanisms against their reference implementations (attention layer, forward + backward)"
        (out / "peers.md").write_text(peers_markdown(rows, header(title, args, time.perf_counter() - started)))
        print(f"bench: finished in {time.perf_counter() - started:.0f} s; results in {out}")
        return 0
    try:
        specs = chosen_specs(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.fidelity:
        rows = fidelity_rows([s for s in specs if s != VANILLA], args.lengths, args.scales,
                             Shape(args.batch, args.heads, args.head_dim), args.device, args.configs, args.seed)
        write_csv(out / "fidelity.csv", rows, FIDELITY_COLUMNS)
        (out / "fidelity.md").write_text(fidelity_markdown(rows, args, time.perf_counter() - started))
    else:
        def save(rows: list[dict]) -> None:
            add_ratios(rows)
            write_csv(out / "bench.csv", rows, COLUMNS)

        rows = measure(args, measurement_plan(args, specs), save)
        for mode in dict.fromkeys(r["mode"] for r in rows):
            plot(rows, mode, out / f"bench_{mode}.png")
        targets = [t for t in check_targets(rows) if args.targets or t[0] != "MISSING"]
        for _, line in targets:
            print(line)
        (out / "bench.md").write_text(speed_markdown(rows, targets, args, time.perf_counter() - started))
    print(f"bench: finished in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
