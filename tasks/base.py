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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """Raised when a task's files are missing; the message says which command provides them."""


class DataFormatError(ValueError):
    """Raised on a malformed data file; the message names the file, the line or field, and the fix."""


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


class EpochShuffleSampler(DistributedSampler):
    """A shuffle that is a pure function of (seed, epoch), sharded over ranks, able to resume.

    Each epoch one permutation of the n rows is padded (repeating its start, as
    DistributedSampler does) to a multiple of the world size, and rank r takes positions r, r +
    world, r + 2·world, ... Lightning calls ``set_epoch`` each epoch, and leaves a
    DistributedSampler in place instead of wrapping it in its own.

    A run resumed mid-epoch passes ``resume=(epoch, samples_done)``, samples_done counting all
    ranks: that epoch's permutation is recomputed and each rank skips its first samples_done /
    world samples, which are exactly the first samples_done of the permutation (with another world
    size than before too, up to rounding). ``len()`` stays the full shard length in that epoch, since Lightning
    counts the batches done before the interruption towards the same epoch.
    """

    def __init__(self, n: int, seed: int, resume: tuple[int, int] = (0, 0), num_replicas: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self.epoch, self.resume = resume[0], resume

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = (order * math.ceil(self.total_size / max(self.n, 1)))[: self.total_size]
        shard = order[self.rank : self.total_size : self.num_replicas]
        if self.resume[0] == self.epoch and self.resume[1]:
            shard, self.resume = shard[self.resume[1] // self.num_replicas :], (0, 0)
        return iter(shard)


class ShardSampler(DistributedSampler):
    """Evaluation rows split over ranks without padding: rank r takes rows r, r + world, r +
    2·world, ..., so every row is counted exactly once. Lightning's own DistributedSampler would
    repeat rows to even out the shards, counting a few of them twice in val/test accuracy; being
    a DistributedSampler, this one is left in place. Shards differ by at most one row, which is
    harmless in evaluation: no collective runs per batch, and the accuracy's counts are summed
    over ranks once at the end."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.rows = range(rank, n, num_replicas)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)


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


class LRADataModule(L.LightningDataModule):
    """Base datamodule: subclasses provide ``build_split``, ``source_files`` and the class attributes below."""

    name: str = "task"
    num_classes: int = 2
    vocab_size: int = 256
    is_pair: bool = False
    pixel0_is_padding: bool = False  # image tasks: black pixels become padding (the LRA code's habit)

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
        return rows

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
