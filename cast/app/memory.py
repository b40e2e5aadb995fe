"""The one memory probe of the application: a run's peak (results.json) and the benchmark's."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB: the CUDA allocator's on a GPU, else the process's peak resident set."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
