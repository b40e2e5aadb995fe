"""Image: CIFAR-10 in the hub's layout becomes 1024 row-major gray-level tokens (gray + 1)."""

from __future__ import annotations

import io
import sys
import types

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from scripts.prepare_data import main as prepare_main
from tasks import sources
from tasks.base import DataFormatError, DataNotFoundError
from tasks.image import ImageDataModule, grayscale
from tests.helpers.hub import CIFAR_FEATURES, PIXELS, cifar, picture


@pytest.fixture
def parquet_dir(tmp_path):
    folder = tmp_path / "image" / "plain_text"
    folder.mkdir(parents=True)
    for name, dataset in cifar().items():
        dataset.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return tmp_path / "image"


def test_grayscale_follows_tensorflow_rounding():
    rgb = np.array([p for p, _ in PIXELS], dtype=np.uint8)
    assert grayscale(rgb).tolist() == [g for _, g in PIXELS]


def test_tokens_are_gray_plus_one_row_major_with_lra_splits(parquet_dir):
    dm = ImageDataModule(str(parquet_dir), batch_size=8)
    dm.setup()
    train, val, test = dm.rows("train"), dm.rows("val"), dm.rows("test")
    assert train["input_ids"].shape == (18, 1024) and val["input_ids"].shape == (2, 1024)
    assert train["input_ids"].dtype == torch.long and train["mask"].all() and val["mask"].all()
    assert train["label"].tolist() == [i % 10 for i in range(18)]
    assert val["label"].tolist() == [8, 9], "val = the last 10% of CIFAR-10's training set"
    assert test["label"].tolist() == [3, 4, 5, 6]
    row = train["input_ids"][2]
    assert row[1].item() == 256 and row[32].item() == 1, "row-major: (0, 1) -> 1, (1, 0) -> 32"
    assert row[0].item() == row[1023].item() == 141 + 1
    for index in range(6):
        assert train["input_ids"][index, 5].item() == PIXELS[index][1] + 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 1024) and batch["label"].dtype == torch.long
    assert dm.vocab_size == 257 and dm.num_classes == 10 and dm.max_length == 1024


def test_pixel0_is_padding_masks_black_pixels(parquet_dir):
    dm = ImageDataModule(str(parquet_dir), pixel0_is_padding=True)
    train = dm.rows("train")
    black = train["input_ids"][0]  # image 0 is black apart from one white pixel
    assert black[1].item() == 256 and (black[torch.arange(1024) != 1] == 0).all()
    assert train["mask"][0].sum().item() == 1
    assert train["mask"][2].sum().item() == 1023, "only the one black pixel of a gray image is masked"
    plain = ImageDataModule(str(parquet_dir)).rows("train")
    assert plain["mask"].all() and torch.equal(plain["input_ids"][0][black != 0], black[black != 0])


def test_short_max_length_keeps_the_first_pixels(parquet_dir):
    dm = ImageDataModule(str(parquet_dir), max_length=64)
    full = ImageDataModule(str(parquet_dir)).rows("test")["input_ids"]
    assert torch.equal(dm.rows("test")["input_ids"], full[:, :64])


def test_save_to_disk_layout_reads_the_same(parquet_dir, tmp_path):
    cifar().save_to_disk(str(tmp_path / "saved" / "hf_dataset"))
    a = ImageDataModule(str(parquet_dir)).build_split("test")
    b = ImageDataModule(str(tmp_path / "saved")).build_split("test")
    assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["label"], b["label"])


def write_cells(tmp_path, cells):
    folder = tmp_path / "plain_text"
    folder.mkdir()
    path = folder / "train-00000-of-00001.parquet"
    rows = {"img": cells, "label": [0] * len(cells)}
    datasets.Dataset.from_dict(rows, features=CIFAR_FEATURES).to_parquet(str(path))
    return path


def test_corrupt_image_names_the_file_and_row(tmp_path):
    good = io.BytesIO()
    Image.fromarray(picture(0)).save(good, format="PNG")
    write_cells(tmp_path, [{"bytes": good.getvalue(), "path": None}, {"bytes": b"\x89PNG broken", "path": None}])
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001\.parquet: row 1: cannot decode"):
        ImageDataModule(str(tmp_path)).build_split("train")


def test_wrong_image_size_is_a_format_error(tmp_path):
    write_cells(tmp_path, [Image.new("RGB", (16, 16))])
    with pytest.raises(DataFormatError, match=r"row 0: image is 16x16, expected 32x32"):
        ImageDataModule(str(tmp_path)).build_split("train")


def test_cache_is_reused(parquet_dir, monkeypatch):
    ImageDataModule(str(parquet_dir)).setup()
    again = ImageDataModule(str(parquet_dir))
    monkeypatch.setattr(again, "build_split", lambda split: pytest.fail("cached tensors should be reused"))
    again.setup()
    assert again.rows("val")["input_ids"].shape == (2, 1024)


def test_missing_data_names_the_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="(?s)Image: no CIFAR-10 'train' split under .*"
                       "prepare_data.py image --out .*huggingface.co/datasets/"):
        ImageDataModule(str(tmp_path)).setup()


def test_tfds_source_reads_supervised_pairs(tmp_path, monkeypatch):
    images = [(picture(i), i) for i in range(10)]
    fake = types.SimpleNamespace(load=lambda name, split, data_dir, download, as_supervised: images, as_numpy=iter)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    (tmp_path / "tfds" / "cifar10").mkdir(parents=True)
    dm = ImageDataModule(str(tmp_path), source="tfds")
    assert dm.build_split("train")["label"].tolist() == list(range(9))
    assert dm.rows("val")["input_ids"][0, 5].item() == PIXELS[9 % 6][1] + 1


def test_prepare_saves_the_hub_data_set_where_the_task_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "probe_hub", lambda name: None)  # the hub answers
    monkeypatch.setattr(datasets, "load_dataset", lambda name, cache_dir: cifar())
    out = tmp_path / "image"
    assert prepare_main(["image", "--out", str(out), "--hub-name", "uoft-cs/cifar10"]) == 0
    assert ImageDataModule(str(out)).build_split("test")["label"].tolist() == [3, 4, 5, 6]
