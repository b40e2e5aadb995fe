"""Pathfinder and Path-X (LRA): are the two markers joined by one dashed path? 2 classes.

Reads the release layout ``pathfinder{R}/<difficulty folder>/`` found at any depth under
``data_dir``: ``metadata/<batch>.npy`` (plain text despite the extension: one line per image,
space-separated, field 0 the folder such as ``imgs/0``, field 1 the file name, field 3 the label)
and ``imgs/<batch>/sample_<i>.png`` (8-bit grayscale, R × R). Empty image files are skipped (the
release has one). LRA Pathfinder is R = 32 (1,024 tokens) and Path-X R = 128 (16,384 tokens), both
``curv_contour_length_14`` (difficulty ``hard``).

Tokens: the pixels row by row, intensity v → id v + 1, id 0 = padding (vocab_size 257). With
``pixel0_is_padding`` black pixels become padding (id 0, mask False), as the LRA code did; off
by default, since black is most of every image and the masked mean pooling would ignore it.
``compact`` then takes the padding out of each batch: the inked pixels alone, with their places
in the image as positions (``positions`` in the batch), so attention costs what the ink needs.
Split: all readable images in (batch, line) order, permuted with ``split_seed``, 80/10/10.

Shapes: M images, N = R² tokens. The cache holds uint8 pixels (M, N); the base class widens them
to ids and masks one batch at a time (Path-X as a long tensor would take 26 GB).
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import MofNCompleteColumn, Progress
from torch import Tensor

from tasks import pathfinder_generator as generator
from cast.options import option_error, require_choice
from tasks.base import DataFormatError, LRADataModule

log = logging.getLogger(__name__)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DECODE_CHUNK = 1000              # images per decode job
POOL_FROM = 4000                 # decode in worker processes from this many images on
BOM = "\ufeff"
FIX = "regenerate this data set (scripts/prepare_data.py pathfinder) or unpack the LRA release again"


def read_metadata(folder: Path) -> list[tuple[Path, int]]:
    """(image path, label) of every metadata line, batches in numeric order."""
    files = sorted((folder / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise DataFormatError(f"{folder / 'metadata'}: no <batch>.npy metadata files; {FIX}")
    entries = []
    for meta in files:
        data = meta.read_bytes()
        try:
            text = data.decode("utf-8").removeprefix(BOM)
        except UnicodeDecodeError as error:
            line_no = data.count(b"\n", 0, error.start) + 1
            raise DataFormatError(f"{meta}:{line_no}: byte {error.start} is {data[error.start:error.start + 1]!r}, not "
                                  "text; Pathfinder metadata .npy files are plain text lines 'FOLDER FILE INDEX LABEL "
                                  f"...'; {FIX}") from None
        for line_no, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise DataFormatError(f"{meta}:{line_no}: expected 'FOLDER FILE INDEX LABEL ...' with LABEL 0 or 1, "
                                      f"found {line!r}; {FIX}")
            entries.append((folder / fields[0] / fields[1], int(fields[3])))
    return entries


def decode(path: Path, resolution: int) -> np.ndarray | None:
    """The (R * R,) uint8 pixels of one PNG, or None for an empty file."""
    try:
        if path.stat().st_size == 0:
            return None
        with Image.open(path) as image:
            pixels = np.asarray(image if image.mode == "L" else image.convert("L"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: listed in the metadata but missing; {FIX}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataFormatError(f"{path}: not a readable PNG ({error}); {FIX}") from None
    if pixels.shape != (resolution, resolution):
        raise DataFormatError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected {resolution}x"
                              f"{resolution}; set task.resolution to the folder's pathfinder<R>")
    return pixels.reshape(-1)


def _decode_chunk(job: tuple[list[Path], int]) -> tuple[np.ndarray, np.ndarray]:
    paths, resolution = job
    images = [decode(p, resolution) for p in paths]
    kept = np.array([im is not None for im in images])
    rows = [im for im in images if im is not None]
    return kept, np.stack(rows) if rows else np.zeros((0, resolution * resolution), np.uint8)


def read_images(paths: list[Path], resolution: int, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode PNGs: (kept (len(paths),) bool, pixels (kept, R * R) uint8), in parallel when many."""
    jobs = [(paths[i : i + DECODE_CHUNK], resolution) for i in range(0, len(paths), DECODE_CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(jobs)) if len(paths) >= POOL_FROM else 1
    kept, pixels = [np.zeros(0, bool)], [np.zeros((0, resolution * resolution), np.uint8)]
    columns = (*Progress.get_default_columns(), MofNCompleteColumn())
    # Workers forked before the progress bar's refresh thread starts (see listops_generator.generate).
    with Pool(workers) if workers > 1 else nullcontext() as pool, \
            Progress(*columns, transient=True, disable=len(paths) < POOL_FROM) as bar:
        task = bar.add_task(f"decoding pathfinder{resolution}", total=len(paths))
        for k, p in pool.imap(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs):
            kept.append(k)
            pixels.append(p)
            bar.update(task, advance=len(k))
    return np.concatenate(kept), np.concatenate(pixels)


class PathfinderDataModule(LRADataModule):
    name = "pathfinder"
    label, lra_average, is_image, report_column = "Pathfinder", True, True, 4
    num_classes = 2
    vocab_size = 257

    def __init__(
        self,
        data_dir: str,
        max_length: int = 1024,
        resolution: int = 32,
        difficulty: str = "hard",
        pixel0_is_padding: bool = False,
        compact: bool = False,
        split_seed: int = 0,
        generate: bool = False,
        generate_count: int = 200_000,
        generate_seed: int = 0,
        distractors: int | None = None,
        decode_workers: int | None = None,
        **kw,
    ):
        super().__init__(data_dir, max_length, **kw)
        require_choice("task", self.name, "difficulty", difficulty, tuple(generator.DIFFICULTIES))
        if max_length != resolution**2:
            raise option_error("task", self.name, "max_length", max_length,
                               f"{resolution ** 2}, the pixels of task.resolution={resolution} images")
        self.resolution, self.difficulty = resolution, difficulty
        self.pixel0_is_padding, self.split_seed = pixel0_is_padding, split_seed
        self.compact = compact
        self.generate, self.generate_count, self.generate_seed = generate, generate_count, generate_seed
        if distractors is not None and (isinstance(distractors, bool) or not isinstance(distractors, int) or distractors < 0):
            raise option_error("task", self.name, "distractors", distractors,
                               "a number of distractor snakes >= 0, or null for the release's")
        self.distractors = distractors
        self.decode_workers = decode_workers
        if resolution != 32:
            self.name = "pathx" if resolution == 128 else f"pathfinder{resolution}"
        self._all: tuple[Tensor, Tensor] | None = None

    def generator_settings(self) -> dict:
        """What generated data must have been drawn with (its manifest)."""
        settings = generator.Settings.release(self.resolution, self.difficulty, self.distractors)
        return generator.manifest(settings, self.generate_seed, self.generate_count)

    def cache_key(self) -> dict:
        key = super().cache_key()
        key.update(resolution=self.resolution, difficulty=self.difficulty, split_seed=self.split_seed)
        if self.generate:
            key.update(generate_count=self.generate_count, generate_seed=self.generate_seed,
                       distractors=self.distractors)
        return key

    def source_files(self, split: str) -> list[Path]:
        """The metadata files: they list the images (which are too many to check on every load),
        and generating or unpacking a data set rewrites them with its images."""
        path = self.locate(generator.folder_name(self.resolution, self.difficulty))
        return sorted((path / "metadata").glob("*.npy")) if path is not None else []

    def _write(self, out: Path) -> None:
        generator.write_release(out, self.resolution, self.difficulty, self.generate_count, seed=self.generate_seed,
                                distractors=self.distractors)

    def folder(self) -> Path:
        command = f"pathfinder --out {{out}} --resolution {self.resolution} --difficulty {self.difficulty}"
        if self.distractors is not None:
            command += f" --distractors {self.distractors}"
        return self.find_data(generator.folder_name(self.resolution, self.difficulty), "Pathfinder", command,
                              self.generator_settings(), self._write)

    def _read_all(self) -> tuple[Tensor, Tensor]:
        """Pixels (M, N) uint8 and labels (M,) of the whole data set, read once per instance."""
        if self._all is None:
            folder = self.folder()
            entries = read_metadata(folder)
            kept, pixels = read_images([p for p, _ in entries], self.resolution, self.decode_workers)
            if (~kept).any():
                log.info("pathfinder: skipped %d empty image files", int((~kept).sum()))
            if not kept.any():
                raise DataFormatError(f"{folder}: the metadata lists no non-empty images; regenerate this data set")
            labels = np.array([label for _, label in entries], dtype=np.int64)[kept]
            self._all = torch.from_numpy(pixels), torch.from_numpy(labels)
        return self._all

    def split_indices(self, n: int) -> dict[str, Tensor]:
        order = torch.from_numpy(np.random.default_rng(self.split_seed).permutation(n))
        n_train, n_val = int(n * SPLIT_FRACTIONS[0]), int(n * SPLIT_FRACTIONS[1])
        return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}

    def build_split(self, split: str) -> dict[str, Tensor]:
        pixels, labels = self._read_all()
        index = self.split_indices(len(labels))[split]
        return {"pixels": pixels[index], "label": labels[index]}

    def prepare_data(self) -> None:
        super().prepare_data()
        self._all = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._all = None
