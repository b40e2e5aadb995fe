"""Image (LRA): CIFAR-10 classification from a sequence of grayscale pixels, 10 classes.

Each 32x32 RGB image becomes 1024 tokens in row-major order (index = 32 * row + column). Gray
level g = trunc(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255), which is what
``tf.image.rgb_to_grayscale`` (used by the LRA code) computes for 8-bit images; the token id is
g + 1 so that id 0 stays padding (vocab_size = 257). Shapes: M images, N = max_length (1024; a
shorter value keeps the first N pixels, for smoke tests); ``input_ids`` long (M, N), ``mask``
bool (M, N), ``label`` long (M,).

``pixel0_is_padding`` (default false): the LRA code derived its padding mask from the input
(``inputs > 0``), so black pixels were masked out of attention. True reproduces that: black
pixels get id 0 and mask False. The default keeps every pixel a real token. ``compact`` (default
false) takes padding out of each batch, each token keeping its place in the image as its position.

Splits, fixed as in LRA: train = the first 90% of CIFAR-10's training set (45,000), val = the
last 10% (5,000), test = the 10,000 test images.

Sources (``source``): ``hf`` (default) a local copy of ``uoft-cs/cifar10`` (columns ``img``,
``label``) under ``data_dir`` (``save_to_disk`` or the hub's parquet files); ``tfds`` the
tensorflow-datasets ``cifar10`` prepared under ``data_dir/tfds``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cast.options import option_error, require_choice
from tasks.base import DataFormatError, LRADataModule
from tasks.sources import SOURCES, check_labels, hub_columns, hub_split_files, tfds_files, tfds_pairs

HUB_NAME = "uoft-cs/cifar10"
TFDS_NAME = "cifar10"
TFDS_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"  # the archive tfds downloads for it
LUMA = (0.2989, 0.5870, 0.1140)
SIDE = 32
TRAIN_FRACTION = 0.9


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) uint8 gray, as tf.image.rgb_to_grayscale (float32 throughout)."""
    luma = (rgb.astype(np.float32) * np.float32(1 / 255)) @ np.asarray(LUMA, dtype=np.float32)
    return np.clip(luma * np.float32(255.5), 0, 255).astype(np.uint8)


def decode_png(payload: dict, source: str, row: int) -> np.ndarray:
    """A hub ``img`` cell ({'bytes', 'path'}) -> (32, 32, 3) uint8; a bad image names file and row."""
    try:
        data = payload["bytes"] if payload.get("bytes") is not None else Path(payload["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, TypeError) as error:
        raise DataFormatError(
            f"{source}: row {row}: cannot decode the image ({error}); re-download with scripts/prepare_data.py image"
        ) from None
    if rgb.shape != (SIDE, SIDE, 3):
        raise DataFormatError(f"{source}: row {row}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected 32x32 (CIFAR-10)")
    return rgb


class ImageDataModule(LRADataModule):
    name = "image"
    label, lra_average, is_image, report_column = "Image", True, True, 3
    num_classes = 10
    vocab_size = 257

    def __init__(self, data_dir: str, max_length: int = SIDE * SIDE, source: str = "hf",
                 pixel0_is_padding: bool = False, compact: bool = False, **kw):
        super().__init__(data_dir, max_length, **kw)
        require_choice("task", self.name, "source", source, SOURCES)
        if not 1 <= max_length <= SIDE * SIDE:
            raise option_error("task", self.name, "max_length", max_length,
                               f"at most {SIDE * SIDE}, the pixels of a CIFAR-10 image")
        self.source = source
        self.pixel0_is_padding, self.compact = pixel0_is_padding, compact

    def cache_key(self) -> dict:
        return {**super().cache_key(), "source": self.source}

    def source_files(self, split: str) -> list[Path]:
        if self.source == "tfds":
            return tfds_files(self.data_dir, TFDS_NAME)
        return hub_split_files(self.data_dir, "test" if split == "test" else "train")

    def _read(self, split: str) -> tuple[np.ndarray, Tensor]:
        """RGB images (M, 32, 32, 3) uint8 and labels of the source's ``split`` (train or test)."""
        if self.source == "tfds":
            pairs = tfds_pairs(self.data_dir, TFDS_NAME, split, self.name)
            labels = check_labels([label for _, label in pairs], self.num_classes, f"tfds {TFDS_NAME}")
            return np.stack([image for image, _ in pairs]).astype(np.uint8), labels
        images, labels = [], []
        for source, columns in hub_columns(self.data_dir, split, ["img", "label"], self.name, "CIFAR-10", HUB_NAME):
            images += [decode_png(cell, source, row) for row, cell in enumerate(columns["img"])]
            labels.append(check_labels(columns["label"], self.num_classes, source))
        return np.stack(images), torch.cat(labels)

    def build_split(self, split: str) -> dict[str, Tensor]:
        images, labels = self._read("test" if split == "test" else "train")
        if split != "test":
            n_train = round(len(images) * TRAIN_FRACTION)
            rows = slice(0, n_train) if split == "train" else slice(n_train, None)
            images, labels = images[rows], labels[rows]
        gray = grayscale(images).reshape(len(images), -1)[:, : self.max_length]
        return {"pixels": torch.from_numpy(np.ascontiguousarray(gray, dtype=np.uint8)), "label": labels}
