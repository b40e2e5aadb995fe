"""Read what an offline W&B run wrote: its .wandb file is a LevelDB-style log of protobuf Records.

Layout: a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):
            break  # the writer is still appending this chunk
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wait_for_exit(path: str | Path, timeout: float = 60.0) -> list[pb.Record]:
    """The run's records once its writer has flushed the final ``exit`` record.

    wandb's core process writes the file on its own schedule: wandb.finish() can return before
    the last records are on disk.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = records(path) if Path(path).exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def summary(path: str | Path) -> dict:
    """The run's final summary: every summary update applied in order."""
    result: dict = {}
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                result[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return result


def tables(path: str | Path) -> list[dict]:
    """Every wandb.Table logged to history: its key plus the reference fields (path, nrows, ncols...).

    wandb 0.2x+ writes a logged dict as one history item per field (nested_key [key, field]);
    older versions wrote one item whose value_json is the whole dict. Both are read.
    """
    found = []
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") != "history":
            continue
        values: dict[str, dict] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if len(keys) > 1:
                values.setdefault("/".join(keys[:-1]), {})[keys[-1]] = value
            elif isinstance(value, dict):
                values.setdefault(keys[0], {}).update(value)
        found += [{"key": key, **value} for key, value in values.items() if value.get("_type") == "table-file"]
    return found


def run_info(path: str | Path) -> dict:
    """The run's name, group and tags as the run record holds them."""
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") == "run":
            return {"name": record.run.display_name, "group": record.run.run_group, "tags": list(record.run.tags)}
    raise AssertionError(f"{path}: no run record")
