"""Read what an offline W&B run wrote: its .wandb file is a LevelDB-style log of protobuf Records.

Layout: a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import json
import struct
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


def summary(path: str | Path) -> dict:
    """The run's final summary: every summary update applied in order."""
    result: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                result[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return result


def tables(path: str | Path) -> list[dict]:
    """Every wandb.Table logged to history, as its JSON payload reference."""
    found = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                value = json.loads(item.value_json)
                if isinstance(value, dict) and value.get("_type") == "table-file":
                    found.append({"key": item.key or "/".join(item.nested_key), **value})
    return found
