"""What every LRA task datamodule shares: tensor caching, finding files, batching.

A task subclasses :class:`LRADataModule`, sets ``name``, ``num_classes``, ``vocab_size`` (ids
0..vocab_size-1, id 0 = padding) and ``is_pair``, and implements ``build_split(split)`` that
returns a dict of compact tensors for one split: ``input_ids`` (M, N) in the smallest integer
dtype that holds the vocabulary, or ``pixels`` uint8 (M, N) for image tasks (id = pixel + 1),
``label`` (M,), and for pair tasks ``input_ids_2``; and ``source_files(split)``, the files that
build_split reads. The base class caches that dict under ``<data_dir>/cache/`` keyed by the
task's settings, with the path, size and modification time of each source file beside it
(``*.sources.json``): replaced or added data files rebuild the cache. It widens each batch in
:meth:`LRADataModule.batch_transform` to ``input_ids`` long, ``mask`` bool (id != 0), ``label``
long: Retrieval's cache is then 3 GB instead of 13 GB, and Path-X's 3.3 GB instead of 26 GB.
Tasks with a generator find their data with :meth:`LRADataModule.find_data`: found under
``data_dir``, else generated when ``generate`` is on, else DataNotFoundError naming the command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tasks.errors import DataFormatError, DataNotFoundError
from tasks.generated import MANIFEST, normal, recorded
from tasks.samplers import EpochShuffleSampler, ShardSampler

# The errors live in tasks/errors.py (light to import) and are re-exported here for the tasks.
__all__ = ["DataFormatError", "DataNotFoundError", "TensorDictDataset", "compact_dtype", "pad_batch", "byte_ids",
           "find_path", "atomic_save", "LRADataModule"]
log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors, fetched a whole batch at a time and transformed."""

    def __init__(self, tensors: dict[str, Tensor], transform: Callable[[dict], dict]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of unequal length: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors, self.transform = tensors, transform

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: t[0] for k, t in self.__getitems__([i]).items()}

    def __getitems__(self, idx: Sequence[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.transform({k: t[index] for k, t in self.tensors.items()})


def _identity(batch):
    return batch


def compact_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds ids 0..vocab_size-1."""
    return torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32768 else torch.long


def pad_batch(sequences: Sequence[Sequence[int]], max_length: int, dtype: torch.dtype = torch.long) -> Tensor:
    """Truncate/pad id lists to ``max_length`` with 0: ids (M, max_length)."""
    ids = torch.zeros(len(sequences), max_length, dtype=dtype)
    for row, seq in enumerate(sequences):
        seq = seq[:max_length]
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=dtype)
    return ids


def byte_ids(docs: Sequence[bytes], max_length: int) -> Tensor:
    """Byte strings -> ids (M, max_length) int16 with id = byte + 1, 0 = padding (LRA's byte-level text)."""
    ids = np.zeros((len(docs), max_length), dtype=np.int16)
    for row, doc in enumerate(docs):
        chunk = np.frombuffer(doc[:max_length], dtype=np.uint8)
        ids[row, : len(chunk)] = chunk
        ids[row, : len(chunk)] += 1
    return torch.from_numpy(ids)


def find_path(root: str | Path, relative: str) -> Path | None:
    """Find ``relative`` (e.g. ``listops-1000/basic_train.tsv``) at any depth below ``root``.

    Archives unpack with varying nesting (``lra_release/lra_release/...``); the shallowest match
    wins, ties broken by name so the choice is stable. The search goes level by level and stops
    at the first level that holds a match, so it never lists what lies deeper: a Pathfinder
    folder one level down is found without walking its million images.
    """
    root = Path(root)
    level, seen = [root] if root.is_dir() else [], set()
    while level:
        hits = sorted(str(p / relative) for p in level if (p / relative).exists())
        if hits:
            return Path(hits[0])
        deeper = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue  # unreadable: nothing to find there
            for entry in entries:
                if entry.is_dir() and (real := os.path.realpath(entry.path)) not in seen:
                    seen.add(real)  # a symlink back up the tree is followed once
                    deeper.append(Path(entry.path))
        level = sorted(deeper)
    return None


def atomic_save(obj, path: Path) -> None:
    """torch.save (or, for a str, a text write) through a temporary file and rename, so a
    half-written file is never read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def compacted(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rows without their padding: each row's real tokens first, in order, padded to the longest
    row of the batch, and ``positions`` (B, L), each token's place in the full sequence, which the
    embedding's position tables read. Attention then costs what the real tokens need."""
    mask = rows["mask"]
    keep = max(int(mask.sum(1).max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :keep]
    return {**rows, "input_ids": rows["input_ids"].gather(1, order), "mask": mask.gather(1, order),
            "positions": order}


class LRADataModule(L.LightningDataModule):
    """Base datamodule: subclasses provide ``build_split``, ``source_files`` and the class attributes below."""

    name: str = "task"
    label: str = ""  # the report's column header (default: name)
    lra_average: bool = False  # counts in the LRA five-task average
    is_image: bool = False  # the sequence is a square pixel grid (visualize draws it as an image)
    report_column: int = 100  # position among the report's columns (the LRA paper's order)
    num_classes: int = 2
    vocab_size: int = 256
    is_pair: bool = False
    pixel0_is_padding: bool = False  # image tasks: black pixels become padding (the LRA code's habit)
    compact: bool = False  # image tasks: padding leaves the sequence, real tokens keep their positions
    generate: bool = False  # tasks with a generator: generate missing or stale data on first use

    def __init__(
        self,
        data_dir: str,
        max_length: int,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: dict[str, dict[str, Tensor]] = {}
        self._resume = (0, 0)
        self._located: dict[str, Path] = {}
        self._unrecorded: set[str] = set()

    def cache_key(self) -> dict:
        """Settings that change the tensors; subclasses add theirs."""
        return {"task": self.name, "max_length": self.max_length}

    def build_split(self, split: str) -> dict[str, Tensor]:
        """Read (or generate) one split and tokenise it; implemented by each task."""
        raise TypeError(f"{type(self).__name__} does not define build_split()")

    def source_files(self, split: str) -> list[Path]:
        """The files ``build_split(split)`` would read now, found without reading (or generating)
        them, [] when there are none; implemented by each task."""
        raise TypeError(f"{type(self).__name__} does not define source_files()")

    def locate(self, relative: str) -> Path | None:
        """``find_path(data_dir, relative)``, remembered once found: every split's cache check and
        the reader ask, and a deep folder costs a listing of every folder above its level."""
        if relative not in self._located:
            found = find_path(self.data_dir, relative)
            if found is None:
                return None
            self._located[relative] = found
        return self._located[relative]

    def find_data(self, relative: str, label: str, command: str, settings: dict, write: Callable[[Path], object]) -> Path:
        """The folder ``relative`` at any depth under data_dir, generated first if ``generate`` asks.

        With ``generate`` on, a missing folder is generated into data_dir by ``write(out)``, and a
        generated one whose manifest records other ``settings`` is generated again in its place;
        a folder without a manifest (the LRA release's) is used as it is and never touched.
        Otherwise a missing folder raises DataNotFoundError naming ``prepare_data.py {command}``.
        """
        found = self.locate(relative)
        have = recorded(found) if found is not None else None
        if self.generate and (found is None or have not in (None, normal(settings))):
            if found is not None:
                changed = sorted(k for k, v in normal(settings).items() if have.get(k) != v)
                log.warning("%s was generated with other %s; generating it again", found, ", ".join(changed))
            write(self.data_dir if found is None else found.parents[len(Path(relative).parts) - 1])
            self._located.pop(relative, None)
            found = self.locate(relative)
        elif self.generate and have is None and relative not in self._unrecorded:
            self._unrecorded.add(relative)  # said once, not for every split
            log.warning("%s has no %s (the LRA release's, or generated before settings were recorded): "
                        "used as it is, whatever the generator settings say", found, MANIFEST)
        if found is None:
            raise DataNotFoundError(
                f"{label}: no {relative} under {self.data_dir}. Generate it with\n"
                f"    python scripts/prepare_data.py {command.format(out=self.data_dir)}\n"
                "or unpack the LRA release there (python scripts/prepare_data.py lra_release), "
                "or set task.generate=true to generate it on first use."
            )
        return found

    def source_identity(self, split: str) -> list[list]:
        """[path relative to data_dir, size, mtime in ns] of each source file, sorted."""
        identity = []
        for path in sorted(set(self.source_files(split))):
            stat = path.stat()
            name = path.relative_to(self.data_dir) if path.is_relative_to(self.data_dir) else path.resolve()
            identity.append([str(name), stat.st_size, stat.st_mtime_ns])
        return identity

    def batch_transform(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cached rows -> what the model sees: ids long, masks bool (id 0 = padding), labels long."""
        rows = dict(rows)
        if "pixels" in rows:
            pixels = rows.pop("pixels").long()
            rows["input_ids"] = (pixels + 1) * (pixels != 0) if self.pixel0_is_padding else pixels + 1
        for suffix in ("", "_2"):
            if f"input_ids{suffix}" in rows:
                ids = rows[f"input_ids{suffix}"] = rows[f"input_ids{suffix}"].long()
                rows[f"mask{suffix}"] = ids != 0
        rows["label"] = rows["label"].long()
        return compacted(rows) if self.compact else rows

    def rows(self, split: str, index: Sequence[int] | Tensor | None = None) -> dict[str, Tensor]:
        """Rows of a split (all by default) exactly as batches carry them."""
        if split not in self.splits:
            self.setup()
        stored = self.splits[split]
        index = torch.arange(len(stored["label"])) if index is None else torch.as_tensor(index)
        return self.batch_transform({k: t[index] for k, t in stored.items()})

    def cache_path(self, split: str) -> Path:
        key = json.dumps(self.cache_key(), sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        return self.data_dir / "cache" / f"{self.name}-{split}-{digest}.pt"

    def load_split(self, split: str) -> dict[str, Tensor]:
        """The cached tensors while their source files are unchanged, else freshly built ones.

        A cache whose source files are all gone (deleted after caching) is still used: nothing
        has replaced the data it was built from.
        """
        path = self.cache_path(split)
        sources_path = path.with_suffix(".sources.json")
        sources = self.source_identity(split)
        if path.exists() and (not sources or _read_json(sources_path) == sources):
            return torch.load(path)
        tensors = self.build_split(split)
        atomic_save(tensors, path)
        atomic_save(json.dumps(self.source_identity(split)), sources_path)  # generating may have made them
        return tensors

    def prepare_data(self) -> None:
        for split in SPLITS:
            self.load_split(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.splits:
                self.splits[split] = self.load_split(split)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the current epoch; saved in every checkpoint."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        # processed, not completed: a save in on_train_batch_end (last.ckpt's periodic one) comes
        # after the batch's step but before Lightning counts it completed.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples_done": done * self.batch_size * trainer.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume = (state["epoch"], state["samples_done"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        dataset = TensorDictDataset(self.splits[split], self.batch_transform)
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = None
        if shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.seed, self._resume, num_replicas=world, rank=rank)
        elif world > 1:
            sampler = ShardSampler(len(dataset), num_replicas=world, rank=rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
