"""What scripts/bench.py writes: the log-log plot, the Markdown tables (the LRA efficiency table's
layout; the fidelity table) with the run's header, and the CSV."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch

from cast.app.tables import markdown as markdown_table
from cast.app.tables import write_records
from cast.bench.benchmark import VANILLA, slope


def plot(rows: list[dict], mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in zip(axes, ("time_ms", "peak_mem_mb"), ("time per step (ms)", "peak memory (MB)")):
        for i, label in enumerate(dict.fromkeys(r["label"] for r in rows if r["mode"] == mode)):
            points = sorted((r["length"], r[key]) for r in rows
                            if r["mode"] == mode and r["label"] == label and (r.get(key) or 0) > 0)
            if points:
                s = slope(points)
                # Past the 10 colours of the default cycle, line styles keep the curves apart.
                ax.plot(*zip(*points), marker="os^"[i // 10 % 3], linestyle=("-", "--", ":")[i // 10 % 3],
                        label=label if s is None else f"{label} (slope {s:.2f})")
        ax.set(xscale="log", yscale="log", xlabel="sequence length", title=title)
        lengths = sorted({r["length"] for r in rows if r["mode"] == mode})
        ax.set_xticks(lengths, [length_label(n) for n in lengths], minor=False)
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{mode}: forward + backward on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def short_status(row: dict) -> str:
    status = row["status"]
    return "OOM" if status.startswith("oom") else "skipped" if status.startswith("skipped") else "error"


def speed_cell(r: dict | None) -> str:
    if r is None or r.get("time_ms") is None:
        return short_status(r) if r else ""
    if r["label"] == VANILLA.label:
        return f"{r['time_ms']:.1f} ms"
    return f"{r['speedup_vs_vanilla']:.2f}×" if r.get("speedup_vs_vanilla") else "–"


def memory_cell(r: dict | None) -> str:
    if r is None or r.get("peak_mem_mb") is None:
        return short_status(r) if r else ""
    peak, rel = r["peak_mem_mb"], r.get("mem_ratio_vs_vanilla")
    text = f"{peak:,.0f}" if peak >= 10 else f"{peak:.2f}"
    return text + (f" ({rel:.2f}×)" if rel is not None and r["label"] != VANILLA.label else "")


def speed_table(rows: list[dict]) -> list[str]:
    """LRA Table 2 layout: vanilla's step time, the others' speed-up; peak memory (ratio to vanilla)."""
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["label"], r["length"]): r for r in rows}
    head = (["mechanism"] + [f"speed {length_label(n)}" for n in lengths]
            + [f"memory {length_label(n)} (MB)" for n in lengths])
    body = [[label] + [speed_cell(cell.get((label, n))) for n in lengths]
            + [memory_cell(cell.get((label, n))) for n in lengths] for label in dict.fromkeys(r["label"] for r in rows)]
    return markdown_table(head, body)


def header(title: str, args, elapsed: float) -> list[str]:
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else f"CPU, torch threads: {torch.get_num_threads()}")
    lines = [f"# {title}", "", f"- device: {device}; torch {torch.__version__}; {datetime.now():%Y-%m-%d %H:%M}",
             f"- command: `python scripts/bench.py {' '.join(args.argv)}`", f"- duration: {elapsed:.0f} s",
             f"- layer: batch {args.batch}, {args.heads} heads of width {args.head_dim} (d_model {args.heads * args.head_dim})"]
    if args.fidelity:
        return lines + [""]
    # --quick, --targets and --peers measure the layer only: no model line for a model that was not run.
    measured = args.mode in ("model", "both") and not getattr(args, "peers", False)
    model = [f"- model: the LRA Text model, batch {args.batch}"] if measured else []
    return lines + model + [f"- repeats: {args.repeats} (median), each after one untimed step; warm-up steps: "
                    f"{args.warmup}; at least {args.min_time_ms:g} ms per mechanism and repeat",
                    f"- CPU malloc: {malloc_line(args)}", ""]


def malloc_line(args) -> str:
    if args.device != "cpu":
        return "not used (CUDA caching allocator)"
    if args.kept_memory:
        return "glibc keeps freed memory for reuse (mmap and trim thresholds raised; --system-malloc turns it off)"
    return "the system's default" + (" (--system-malloc)" if args.system_malloc else "")


def speed_markdown(rows, targets, args, elapsed) -> str:
    lines = header("Attention benchmark: time and peak memory of one training step", args, elapsed)
    titles = {"layer": "Attention layer (forward + backward)", "model": "LRA Text model (training step)"}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        lines += [f"## {titles[mode]}", "", "Speed: vanilla's time per step, the others' speed-up over it "
                  "(higher is faster). Memory: peak MB during one step (its ratio to vanilla).", ""]
        lines += speed_table([r for r in rows if r["mode"] == mode]) + ["", f"![{mode}](bench_{mode}.png)", ""]
    if targets:
        lines += ["## Targets (CAST, attention layer)", ""] + [f"- {line}" for _, line in targets] + [""]
    failed = [f"- {r['mode']} {r['label']} at {r['length']}: {r['status']}" for r in rows if r["status"] != "ok"]
    lines += ["## Not measured", ""] + failed if failed else []
    return "\n".join(lines) + "\n"


def fidelity_markdown(rows, args, elapsed) -> str:
    lines = header("Attention fidelity: ||y - y_exact|| / ||y_exact|| of one forward pass", args, elapsed)
    lines += ["Each mechanism gets vanilla's q/k/v/out projections; its own extra parameters keep their seeded "
              "initialisation (untrained). Inputs are N(0, scale²): a larger scale gives sharper attention.", ""]
    columns = sorted({(r["input_scale"], r["length"]) for r in rows})
    cell = {(r["label"], r["input_scale"], r["length"]): r for r in rows}
    body = [[label] + [f"{c['rel_error']:.3g}" if "rel_error" in c else short_status(c) if c else ""
                       for c in (cell.get((label, *col), {}) for col in columns)]
            + [next((r["reference"] for r in rows if r["label"] == label and "reference" in r), "")]
            for label in dict.fromkeys(r["label"] for r in rows)]
    head = ["mechanism"] + [f"{length_label(n)}, scale {scale:g}" for scale, n in columns] + ["reference"]
    failed = [f"- {r['label']} at {r['length']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines + markdown_table(head, body) + [""] + failed) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """The bench's rows, floats to 6 significant digits (a timing has no more)."""
    write_records(path, rows, columns, digits=6)
