"""IMDb and CIFAR-10 as the Hugging Face hub holds them (the features of stanfordnlp/imdb and
uoft-cs/cifar10), small enough to build in a test."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image

IMDB_FEATURES = datasets.Features({"text": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["neg", "pos"])})
IMDB_TRAIN = {
    "text": ["Great film!", 'A "so-called" classic<br />', "café crème", "bad", "worse", "meh", "ok fine", "superb"],
    "label": [1, 1, 1, 0, 0, 0, 1, 1],
}
IMDB_TEST = {"text": ["Loved it", "Hated it", "Zzz"], "label": [1, 0, 0]}

CIFAR_FEATURES = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
# (RGB, gray as tf.image.rgb_to_grayscale gives it: trunc(255.5 * luma / 255)); green shows truncation.
PIXELS = [((0, 0, 0), 0), ((255, 255, 255), 255), ((100, 150, 200), 141), ((255, 0, 0), 76), ((0, 255, 0), 149),
          ((0, 0, 255), 29)]


def imdb_dict() -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=IMDB_FEATURES)
                                 for split, rows in (("train", IMDB_TRAIN), ("test", IMDB_TEST))})


def picture(index: int) -> np.ndarray:
    """A 32x32 image whose pixel (0, 1) and (1, 0) differ, filled with PIXELS[index % 6]."""
    rgb = np.full((32, 32, 3), PIXELS[index % 6][0], dtype=np.uint8)
    rgb[0, 1] = (255, 255, 255)
    rgb[1, 0] = (0, 0, 0)
    return rgb


def cifar(n_train: int = 20, n_test: int = 4) -> datasets.DatasetDict:
    def split(n, offset):
        rows = {"img": [Image.fromarray(picture(i)) for i in range(n)], "label": [(i + offset) % 10 for i in range(n)]}
        return datasets.Dataset.from_dict(rows, features=CIFAR_FEATURES)

    return datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 3)})
