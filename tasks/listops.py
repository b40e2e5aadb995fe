"""ListOps: evaluate nested MIN / MAX / MED / SM expressions, 10 classes (LRA, Nangia & Bowman).

Reads the release layout ``listops-1000/basic_{train,val,test}.tsv`` found anywhere under
``data_dir``. Tokens: parentheses dropped, split on whitespace, ids 1..15 for the vocabulary
below, 0 for padding. With ``generate: true`` a missing data set, or one generated with other
settings (its ``generator.json`` says), is generated on first use by
:mod:`tasks.listops_generator` with ``generate_seed`` and the configured sizes and lengths; the
training ``seed`` only orders the batches. Otherwise a missing data set is an error that names the
command that creates it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tasks import listops_generator
from tasks.base import DataFormatError, DataNotFoundError, LRADataModule, compact_dtype, pad_batch

VOCAB = [str(d) for d in range(10)] + ["[MIN", "[MAX", "[MED", "[SM", "]"]
TOKEN_ID = {tok: i + 1 for i, tok in enumerate(VOCAB)}
FILE = "basic_{split}.tsv"
BOM = b"\xef\xbb\xbf"
FIX = "regenerate it with scripts/prepare_data.py listops or unpack the LRA release again"
# The datamodule's names of the generator's settings, for its error messages.
OPTION_NAMES = {"min_length": "task.min_tree_length", "max_length": "task.max_tree_length",
                "max_depth": "task.max_depth", "max_args": "max_args"}


def encode(source: str) -> list[int]:
    return [TOKEN_ID[t] for t in source.split() if t not in ("(", ")")]


def _text(path: Path, line_no: int, offset: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{path}:{line_no}: byte {offset + error.start} of the file is {line[error.start:error.start + 1]!r}, "
            f"not UTF-8 text (a ListOps TSV is plain text); {FIX}"
        ) from None


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Sources and targets of one release TSV (a UTF-8 byte order mark is allowed); a malformed
    or binary line raises naming file, line and the fix."""
    sources, targets = [], []
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw[len(BOM):] if line_no == 1 and raw.startswith(BOM) else raw
            row = _text(path, line_no, offset + len(raw) - len(line), line).rstrip("\r\n").split("\t")
            offset += len(raw)
            if line_no == 1:
                if row != ["Source", "Target"]:
                    raise DataFormatError(f"{path}:1: expected the header 'Source<TAB>Target', found {row!r}; {FIX}")
                continue
            if len(row) != 2 or not row[1].strip().isdigit() or not 0 <= int(row[1]) <= 9:
                raise DataFormatError(f"{path}:{line_no}: expected '<expression><TAB><digit 0-9>', found {row!r}; {FIX}")
            unknown = {t for t in row[0].split() if t not in TOKEN_ID and t not in ("(", ")")}
            if unknown:
                raise DataFormatError(f"{path}:{line_no}: unknown ListOps tokens {sorted(unknown)}; {FIX}")
            sources.append(row[0])
            targets.append(int(row[1]))
    if offset == 0:
        raise DataFormatError(f"{path}: empty, expected the header 'Source<TAB>Target'; {FIX}")
    return sources, targets


class ListOpsDataModule(LRADataModule):
    name = "listops"
    label, lra_average, report_column = "ListOps", True, 0
    num_classes = 10
    vocab_size = len(VOCAB) + 1

    def __init__(
        self,
        data_dir: str,
        max_length: int = 2000,
        generate: bool = False,
        num_train: int = 96_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        min_tree_length: int = 500,
        max_tree_length: int = 2000,
        max_depth: int = 10,
        generate_seed: int = 0,
        **kw,
    ):
        super().__init__(data_dir, max_length, **kw)
        self.generate = generate
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.tree_lengths = (min_tree_length, max_tree_length)
        self.max_depth = max_depth
        self.generate_seed = generate_seed
        if generate:
            listops_generator.check_settings(min_tree_length, max_tree_length, max_depth, names=OPTION_NAMES)

    def generator_settings(self) -> dict:
        """What generated data must have been drawn with (its manifest)."""
        return listops_generator.manifest(self.sizes, self.generate_seed, *self.tree_lengths, self.max_depth)

    def cache_key(self) -> dict:
        key = super().cache_key()
        if self.generate:
            key["generator"] = self.generator_settings()
        return key

    def _write(self, out: Path) -> None:
        listops_generator.write_release(
            out, self.sizes, seed=self.generate_seed, min_length=self.tree_lengths[0],
            max_length=self.tree_lengths[1], max_depth=self.max_depth,
        )

    def _file(self, split: str) -> Path:
        folder = self.find_data(listops_generator.FOLDER, "ListOps", "listops --out {out}",
                                self.generator_settings(), self._write)
        path = folder / FILE.format(split=split)
        if not path.exists():
            raise DataNotFoundError(f"ListOps: {folder} has no {path.name}; {FIX}")
        return path

    def source_files(self, split: str) -> list[Path]:
        folder = self.locate(listops_generator.FOLDER)
        path = folder / FILE.format(split=split) if folder is not None else None
        return [path] if path is not None and path.exists() else []

    def build_split(self, split: str) -> dict[str, Tensor]:
        sources, targets = read_tsv(self._file(split))
        ids = pad_batch([encode(s) for s in sources], self.max_length, compact_dtype(self.vocab_size))
        return {"input_ids": ids, "label": torch.tensor(targets, dtype=torch.uint8)}
