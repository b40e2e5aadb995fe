"""The LRA release's AAN pairs files (Retrieval) in their exact bytes: quotes are plain
characters, labels `0`/`1` or `0.0`/`1.0`."""

from __future__ import annotations

from pathlib import Path

ROWS = {
    "train": [
        b'1.0\tP00-1001\tW99-0203\tWe cite "prior\twork on parsing',
        b"0\tP00-1002\tJ93-1004\tAn unrelated paper.\tA 'quoted' caf\xc3\xa9 text",
        b'1\tP00-1003\tA00-2000\t"\t"',
        b"0.0\tP00-1004\tC00-1000\tshort\tlonger second document here",
    ],
    "eval": [b"0\ta\tb\tx\ty", b"1\tc\td\tz\tw"],
    "test": [b"1\te\tf\tone\ttwo", b"0\tg\th\tthree\tfour", b"1\ti\tj\tfive\tsix"],
}


def write_release(root: Path, rows: dict[str, list[bytes]] = ROWS, newline: bytes = b"\n") -> Path:
    """``root/lra_release/lra_release/tsv_data/new_aan_pairs.{split}.tsv``; returns tsv_data/."""
    folder = root / "lra_release" / "lra_release" / "tsv_data"
    folder.mkdir(parents=True)
    for split, lines in rows.items():
        (folder / f"new_aan_pairs.{split}.tsv").write_bytes(newline.join(lines) + newline)
    return folder
