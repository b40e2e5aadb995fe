"""ListOps: evaluate nested MIN / MAX / MED / SM expressions, 10 classes (LRA, Nangia & Bowman).

Reads the release layout ``listops-1000/basic_{train,val,test}.tsv`` found anywhere under
``data_dir``. Tokens: parentheses dropped, split on whitespace, ids 1..15 for the vocabulary
below, 0 for padding. With ``generate: true`` a missing data set is generated on first use by
:mod:`tasks.listops_generator` with the configured sizes and lengths; otherwise a missing data
set is an error that names the command that creates it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor

from tasks import listops_generator
from tasks.base import DataFormatError, DataNotFoundError, LRADataModule, compact_dtype, find_path, pad_batch

VOCAB = [str(d) for d in range(10)] + ["[MIN", "[MAX", "[MED", "[SM", "]"]
TOKEN_ID = {tok: i + 1 for i, tok in enumerate(VOCAB)}
FILE = "listops-1000/basic_{split}.tsv"


def encode(source: str) -> list[int]:
    return [TOKEN_ID[t] for t in source.split() if t not in ("(", ")")]


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Sources and targets of one release TSV; a malformed line raises naming file and line."""
    sources, targets = [], []
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header != ["Source", "Target"]:
            raise DataFormatError(f"{path}:1: expected the header 'Source<TAB>Target', found {header!r}")
        for line_no, row in enumerate(rows, start=2):
            if len(row) != 2 or not row[1].strip().isdigit() or not 0 <= int(row[1]) <= 9:
                raise DataFormatError(
                    f"{path}:{line_no}: expected '<expression><TAB><digit 0-9>', found {row!r}; "
                    "regenerate the file with scripts/prepare_data.py listops"
                )
            unknown = {t for t in row[0].split() if t not in TOKEN_ID and t not in ("(", ")")}
            if unknown:
                raise DataFormatError(f"{path}:{line_no}: unknown ListOps tokens {sorted(unknown)}")
            sources.append(row[0])
            targets.append(int(row[1]))
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
        **kw,
    ):
        super().__init__(data_dir, max_length, **kw)
        self.generate = generate
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.tree_lengths = (min_tree_length, max_tree_length)
        self.max_depth = max_depth

    def cache_key(self) -> dict:
        key = super().cache_key()
        if self.generate:
            key.update(sizes=self.sizes, tree_lengths=self.tree_lengths, max_depth=self.max_depth)
        return key

    def _file(self, split: str) -> Path:
        path = find_path(self.data_dir, FILE.format(split=split))
        if path is None and self.generate:
            listops_generator.write_release(
                self.data_dir, self.sizes, seed=self.seed, min_length=self.tree_lengths[0],
                max_length=self.tree_lengths[1], max_depth=self.max_depth,
            )
            path = find_path(self.data_dir, FILE.format(split=split))
        if path is None:
            raise DataNotFoundError(
                f"ListOps: no {FILE.format(split=split)} under {self.data_dir}. Generate it with\n"
                f"    python scripts/prepare_data.py listops --out {self.data_dir}\n"
                "or unpack the LRA release there (python scripts/prepare_data.py lra_release), "
                "or set task.generate=true to generate it on first use."
            )
        return path

    def source_files(self, split: str) -> list[Path]:
        path = find_path(self.data_dir, FILE.format(split=split))
        return [path] if path is not None else []

    def build_split(self, split: str) -> dict[str, Tensor]:
        sources, targets = read_tsv(self._file(split))
        ids = pad_batch([encode(s) for s in sources], self.max_length, compact_dtype(self.vocab_size))
        return {"input_ids": ids, "label": torch.tensor(targets, dtype=torch.uint8)}
