"""Text (LRA): IMDb movie-review sentiment from raw bytes, 2 classes (Maas et al. 2011).

Tokens are UTF-8 bytes: byte b becomes id b + 1, id 0 is padding (so vocab_size = 257, as LRA's
``ByteTextEncoder``); each review is truncated/padded to ``max_length`` (4000 in the LRA paper,
1000 in the released config). Shapes: M reviews, N = max_length; ``input_ids`` long (M, N),
``mask`` bool (M, N), ``label`` long (M,) with 0 = negative, 1 = positive.

Sources (``source``):
- ``hf`` (default): a local copy of the Hugging Face data set ``stanfordnlp/imdb`` (columns
  ``text``, ``label``) under ``data_dir``, either as written by ``prepare_data.py text`` (a
  ``save_to_disk`` folder) or the hub's parquet files placed there by hand;
- ``tfds``: tensorflow-datasets ``imdb_reviews`` prepared under ``data_dir/tfds`` (the loader the
  LRA code used; needs the ``tfds`` extra).
Splits: train = the 25,000 training reviews; LRA validates on the test set (IMDb has no
validation split), so ``val_split: test`` is the default; ``val_split: 0.1`` instead holds out a
fixed random 10% of train (permutation seeded with 0, the same for every run seed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from cast.options import option_error, require_choice
from tasks.base import DataFormatError, LRADataModule, byte_ids
from tasks.sources import SOURCES, check_labels, hub_columns, hub_split_files, tfds_files, tfds_pairs

HUB_NAME = "stanfordnlp/imdb"
TFDS_NAME = "imdb_reviews"
TFDS_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"  # the archive tfds downloads for it
VAL_SEED = 0


def validation_rows(n: int, fraction: float) -> tuple[Tensor, Tensor]:
    """(train rows, val rows) of a fixed random split of n training rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    n_val = round(n * fraction)
    return order[n_val:].sort().values, order[:n_val].sort().values


class TextDataModule(LRADataModule):
    name = "text"
    label, lra_average, report_column = "Text", True, 1
    num_classes = 2
    vocab_size = 257

    def __init__(self, data_dir: str, max_length: int = 4000, source: str = "hf", val_split: str | float = "test", **kw):
        super().__init__(data_dir, max_length, **kw)
        require_choice("task", self.name, "source", source, SOURCES)
        if val_split != "test" and not (isinstance(val_split, float) and 0 < val_split < 1):
            raise option_error("task", self.name, "val_split", val_split, "'test' (LRA) or a fraction of train in (0, 1)")
        self.source = source
        self.val_split = val_split

    def cache_key(self) -> dict:
        return {**super().cache_key(), "source": self.source, "val_split": self.val_split}

    def load_split(self, split: str) -> dict[str, Tensor]:
        if split == "val" and self.val_split == "test":  # one cache file and one tensor for both
            if "test" not in self.splits:
                self.splits["test"] = super().load_split("test")
            return self.splits["test"]
        return super().load_split(split)

    def _source_split(self, split: str) -> str:
        """The source's split (train or test) that ``split`` is made from."""
        return "test" if split == "test" or (split == "val" and self.val_split == "test") else "train"

    def source_files(self, split: str) -> list[Path]:
        if self.source == "tfds":
            return tfds_files(self.data_dir, TFDS_NAME)
        return hub_split_files(self.data_dir, self._source_split(split))

    def _read(self, split: str) -> tuple[list[bytes], Tensor]:
        """Raw reviews (bytes) and labels of the source's ``split`` (train or test)."""
        if self.source == "tfds":
            pairs = tfds_pairs(self.data_dir, TFDS_NAME, split, self.name)
            labels = check_labels([label for _, label in pairs], self.num_classes, f"tfds {TFDS_NAME}")
            return [bytes(text) for text, _ in pairs], labels
        texts, labels = [], []
        for source, columns in hub_columns(self.data_dir, split, ["text", "label"], self.name, "IMDb", HUB_NAME):
            bad = next((row for row, text in enumerate(columns["text"]) if not isinstance(text, str)), None)
            if bad is not None:
                raise DataFormatError(f"{source}: row {bad}: field 'text' holds {columns['text'][bad]!r}, not a "
                                      f"string; download it again with python scripts/prepare_data.py text "
                                      f"--out {self.data_dir}")
            texts += [t.encode("utf-8") for t in columns["text"]]
            labels.append(check_labels(columns["label"], self.num_classes, source))
        return texts, torch.cat(labels)

    def build_split(self, split: str) -> dict[str, Tensor]:
        texts, labels = self._read(self._source_split(split))
        if split != "test" and self.val_split != "test":
            rows = validation_rows(len(texts), self.val_split)[1 if split == "val" else 0]
            texts, labels = [texts[i] for i in rows], labels[rows]
        return {"input_ids": byte_ids(texts, self.max_length), "label": labels}
