"""Retrieval (LRA): does paper 1 cite paper 2? Byte-level document matching on the ACL Anthology
Network (AAN, Radev et al. 2013), 2 classes, two documents per example.

Reads the LRA release's ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` found at any depth under
``data_dir`` (``eval`` serves as the validation split): tab-separated, no header, quotes are plain
characters, columns ``label, id1, id2, text1, text2`` with the label written ``0``/``1`` or
``0.0``/``1.0``; blank lines and a UTF-8 byte order mark are skipped. Each document is tokenised like Text (byte b -> id b + 1,
0 = padding) and truncated/padded to ``max_length`` (4000 per document in LRA).

Shapes: M pairs, N = max_length; ``input_ids``/``mask`` (M, N) for text1, ``input_ids_2``/``mask_2``
(M, N) for text2, ``label`` (M,).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tasks.base import DataFormatError, DataNotFoundError, LRADataModule, byte_ids

FILE = "tsv_data/new_aan_pairs.{split}.tsv"
FILE_SPLIT = {"train": "train", "val": "eval", "test": "test"}
LABELS = {b"0": 0, b"1": 1, b"0.0": 0, b"1.0": 1}
BOM = b"\xef\xbb\xbf"


def read_tsv(path: Path) -> tuple[list[bytes], list[bytes], list[int]]:
    """(text1s, text2s, labels) of one AAN pairs file; a malformed row (binary data too) names
    file, line and byte offset. Documents stay bytes: any byte is a token."""
    first, second, labels = [], [], []
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if line_no == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            offset += len(raw)
            if not line:
                continue
            fields = line.split(b"\t")
            if len(fields) != 5 or fields[0].strip() not in LABELS:
                raise DataFormatError(
                    f"{path}:{line_no} (byte {offset - len(raw)}): expected 5 tab-separated fields 'label id1 id2 "
                    f"text1 text2' with label 0/1, found {len(fields)} field(s) starting {line[:60]!r}; the file is "
                    "damaged or not the release's: unpack the LRA release again (scripts/prepare_data.py lra_release)"
                )
            labels.append(LABELS[fields[0].strip()])
            first.append(fields[3])
            second.append(fields[4])
    return first, second, labels


class RetrievalDataModule(LRADataModule):
    name = "retrieval"
    label, lra_average, report_column = "Retrieval", True, 2
    num_classes = 2
    vocab_size = 257
    is_pair = True

    def __init__(self, data_dir: str, max_length: int = 4000, **kw):
        super().__init__(data_dir, max_length, **kw)

    def source_files(self, split: str) -> list[Path]:
        path = self.locate(FILE.format(split=FILE_SPLIT[split]))
        return [path] if path is not None else []

    def build_split(self, split: str) -> dict[str, Tensor]:
        files = self.source_files(split)
        if not files:
            raise DataNotFoundError(
                f"Retrieval: no {FILE.format(split=FILE_SPLIT[split])} under {self.data_dir}. Download and unpack "
                "the LRA release with\n"
                f"    python scripts/prepare_data.py lra_release --out {self.data_dir}\n"
                "(about 8 GB), or point task.data_dir at an unpacked copy."
            )
        first, second, labels = read_tsv(files[0])
        return {"input_ids": byte_ids(first, self.max_length), "input_ids_2": byte_ids(second, self.max_length),
                "label": torch.tensor(labels, dtype=torch.uint8)}
