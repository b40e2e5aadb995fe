"""The GPU check's one report: `make gpu-check` runs the CUDA tests (tests/gpu: every mechanism on
the device in float32 and bf16, the fused kernels, every experiment=lra/* preset for a few hundred
steps on fixture data) and `scripts/bench.py --targets --device cuda` into one folder, then

    python -m cast.bench.gpu_check outputs/gpu-check

writes report.md there from what they left: the device, the tests' closing line, the presets'
throughput and memory, and the benchmark's target lines and table.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

from cast.app.tables import markdown

PRESET_COLUMNS = ("preset", "attention", "status", "steps", "samples_per_s", "peak_mem_mb", "wall_time_s")


def _lines(path: Path, keep) -> list[str]:
    return [line.rstrip() for line in path.read_text().splitlines() if keep(line)] if path.exists() else []


def report(out: Path) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    parts = [f"# GPU check\n\nDevice: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}.\n"]
    closing = _lines(out / "tests.log", lambda line: " passed" in line or " failed" in line or " error" in line)
    parts.append("## CUDA tests (pytest -m cuda tests/gpu)\n\n" + (closing[-1] if closing else "no test log") + "\n")
    presets = out / "presets.csv"
    if presets.exists():
        with presets.open() as f:
            rows = list(csv.DictReader(f))
        body = [[row.get(k) or "" for k in PRESET_COLUMNS] for row in rows]
        parts.append("## LRA presets, a few hundred steps each\n\n" + "\n".join(markdown(PRESET_COLUMNS, body)) + "\n")
    targets = _lines(out / "bench.log", lambda line: line.startswith(("PASS", "FAIL")))
    parts.append("## CAST's targets (scripts/bench.py --targets --device cuda)\n\n```\n" + "\n".join(targets or ["no bench log"])
                 + "\n```\n")
    bench_md = out / "bench" / "bench.md"
    if bench_md.exists():
        parts.append(bench_md.read_text())
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "outputs/gpu-check")
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
