"""Pathfinder / Path-X reader: release layout, labels, skipped images, splits, errors, Path-X batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cast.options import OptionError
from tasks import base, pathfinder
from tasks.base import DataFormatError, DataNotFoundError, find_path
from tasks.pathfinder import PathfinderDataModule, read_images, read_metadata
from tasks.pathfinder_generator import write_release

FOLDER = "pathfinder32/curv_contour_length_14"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """40 generated 32x32 images in 3 batches (16, 16, 8)."""
    out = tmp_path_factory.mktemp("pathfinder")
    write_release(out, count=40, seed=1, batch_size=16, workers=1, progress=False)
    return out


@pytest.fixture
def copy(generated, tmp_path):
    """A private copy of the generated set, under ``tmp_path/<relative>``."""

    def make(relative: str = "data"):
        target = tmp_path / relative
        shutil.copytree(generated / FOLDER, target / FOLDER)
        return target

    return make


def _all_rows(dm: PathfinderDataModule) -> dict[bytes, int]:
    """Every image of the three splits, as {pixel bytes: label}."""
    rows = {}
    for split in ("train", "val", "test"):
        ids = dm.rows(split)["input_ids"]
        for row, label in zip(ids, dm.splits[split]["label"].tolist()):
            rows[(row - 1).to(torch.uint8).numpy().tobytes()] = label
    return rows


def test_round_trip_labels_equal_metadata(generated):
    dm = PathfinderDataModule(str(generated), batch_size=8)
    dm.setup()
    expected = {}
    for path, label in read_metadata(generated / FOLDER):
        expected[np.asarray(Image.open(path)).tobytes()] = label
    assert len(expected) == 40
    assert _all_rows(dm) == expected
    assert [len(dm.splits[s]["label"]) for s in ("train", "val", "test")] == [32, 4, 4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 1024) and batch["input_ids"].dtype == torch.long
    assert batch["mask"].dtype == torch.bool and batch["mask"].all()
    assert batch["label"].dtype == torch.long
    assert 1 <= int(batch["input_ids"].min()) and int(batch["input_ids"].max()) <= 256


def test_split_is_deterministic_and_cached(copy, monkeypatch):
    data = copy()
    first = PathfinderDataModule(str(data))
    first.setup()
    again = PathfinderDataModule(str(data))

    def no_rebuild(split):
        raise AssertionError("the cached tensors should have been reused")

    monkeypatch.setattr(again, "build_split", no_rebuild)
    again.setup()
    fresh = PathfinderDataModule(str(copy("other")))
    fresh.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.rows(split)["input_ids"], first.rows(split)["input_ids"])
        assert torch.equal(fresh.splits[split]["label"], first.splits[split]["label"])
    reshuffled = PathfinderDataModule(str(data), split_seed=1)
    reshuffled.setup()
    assert not torch.equal(reshuffled.rows("test")["input_ids"], first.rows("test")["input_ids"])


def test_rewritten_metadata_rebuilds_the_cache(copy):
    data = copy()
    PathfinderDataModule(str(data)).setup()
    meta = data / FOLDER / "metadata" / "2.npy"  # the last batch's 8 images
    meta.write_text("")
    again = PathfinderDataModule(str(data))
    again.setup()
    assert sum(len(again.splits[s]["label"]) for s in ("train", "val", "test")) == 32


def test_empty_image_is_skipped_and_nesting_is_found(copy):
    root = copy("lra_release/lra_release")
    empty = root / FOLDER / "imgs" / "1" / "sample_3.png"
    skipped = np.asarray(Image.open(empty)).tobytes()
    empty.write_bytes(b"")
    dm = PathfinderDataModule(str(root.parents[1]))
    dm.setup()
    rows = _all_rows(dm)
    assert len(rows) == 39 and skipped not in rows


def test_a_nested_folder_is_searched_for_once_per_datamodule(copy, monkeypatch):
    root = copy("lra_release/lra_release")
    searches = []
    monkeypatch.setattr(base, "find_path", lambda *a: searches.append(a) or find_path(*a))
    for _ in range(2):  # building the caches, then loading them
        PathfinderDataModule(str(root.parents[1])).setup()
        assert len(searches) == 1
        searches.clear()


def test_pixel0_is_padding_masks_black_pixels(generated):
    dm = PathfinderDataModule(str(generated), pixel0_is_padding=True)
    dm.setup()
    ids, mask = dm.rows("val")["input_ids"], dm.rows("val")["mask"]
    assert 0 < mask.float().mean() < 0.5, "most of an image is black"
    assert torch.equal(ids == 0, ~mask) and int(ids[mask].min()) >= 2


def test_compact_keeps_only_the_ink_with_its_places_in_the_image(generated):
    full = PathfinderDataModule(str(generated), pixel0_is_padding=True)
    compact = PathfinderDataModule(str(generated), pixel0_is_padding=True, compact=True)
    rows, packed = full.rows("val"), compact.rows("val")
    assert packed["input_ids"].shape[1] == int(rows["mask"].sum(1).max()) < 1024 / 2
    assert torch.equal(packed["mask"].sum(1), rows["mask"].sum(1))
    assert torch.equal(packed["input_ids"] != 0, packed["mask"]), "real tokens first, padding after"
    positions = packed["positions"]
    assert (positions[:, 1:] > positions[:, :-1])[packed["mask"][:, 1:]].all(), "image order kept"
    image = torch.zeros_like(rows["input_ids"]).scatter_(1, positions, packed["input_ids"] * packed["mask"])
    assert torch.equal(image, rows["input_ids"]), "every inked pixel back in its place"


def test_malformed_metadata_names_the_file_and_line(copy):
    data = copy()
    meta = data / FOLDER / "metadata" / "1.npy"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:2] + ["imgs/1 sample_2.png 2"] + lines[3:]) + "\n")
    with pytest.raises(DataFormatError, match=r"metadata/1\.npy:3"):
        PathfinderDataModule(str(data)).setup()
    meta.write_text("\n".join(lines[:2] + ["imgs/1 sample_2.png 2 yes"] + lines[3:]) + "\n")
    with pytest.raises(DataFormatError, match=r"1\.npy:3: .*LABEL 0 or 1"):
        read_metadata(data / FOLDER)


def test_corrupt_or_missing_image_names_the_file(copy):
    data = copy()
    broken = data / FOLDER / "imgs" / "2" / "sample_5.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=r"imgs/2/sample_5\.png: not a readable PNG"):
        PathfinderDataModule(str(data)).setup()
    broken.unlink()
    with pytest.raises(DataFormatError, match=r"sample_5\.png: listed in the metadata but missing"):
        PathfinderDataModule(str(data)).setup()


def test_wrong_resolution_and_length_are_explained(copy, generated):
    data = copy()
    Image.new("L", (64, 64)).save(data / FOLDER / "imgs" / "0" / "sample_0.png")
    with pytest.raises(DataFormatError, match=r"sample_0\.png: image is 64x64, expected 32x32"):
        PathfinderDataModule(str(data)).setup()
    with pytest.raises(ValueError, match=r"max_length=64 must be 1024, .* set task.max_length in configs/task/pathfinder.yaml"):
        PathfinderDataModule(str(generated), max_length=64)
    with pytest.raises(ValueError, match="difficulty=.medium. must be one of"):
        PathfinderDataModule(str(generated), difficulty="medium")


def test_missing_data_names_the_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="prepare_data.py pathfinder --out .* --resolution 128"):
        PathfinderDataModule(str(tmp_path), max_length=128 * 128, resolution=128).setup()


def test_parallel_decode_matches_serial(generated, monkeypatch):
    paths = [p for p, _ in read_metadata(generated / FOLDER)]
    kept, serial = read_images(paths, 32, workers=1)
    monkeypatch.setattr(pathfinder, "POOL_FROM", 10)
    monkeypatch.setattr(pathfinder, "DECODE_CHUNK", 7)
    kept_pool, pooled = read_images(paths, 32, workers=2)
    assert kept.all() and kept_pool.all() and np.array_equal(serial, pooled)


def test_pathx_batches_build_from_generated_data(tmp_path):
    dm = PathfinderDataModule(str(tmp_path), max_length=128 * 128, resolution=128, generate=True,
                              generate_count=10, batch_size=4)
    dm.setup()
    assert dm.name == "pathx" and (tmp_path / "pathfinder128" / "curv_contour_length_14" / "metadata").is_dir()
    assert [len(dm.splits[s]["label"]) for s in ("train", "val", "test")] == [8, 1, 1]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16384) and batch["input_ids"].dtype == torch.long
    assert batch["mask"].shape == (4, 16384) and batch["mask"].all()
    assert set(batch["label"].tolist()) <= {0, 1}


def test_metadata_with_a_byte_order_mark_is_read(copy):
    data = copy()
    meta = data / FOLDER / "metadata" / "0.npy"
    expected = read_metadata(data / FOLDER)
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    assert read_metadata(data / FOLDER) == expected


def test_binary_metadata_names_the_file_line_and_byte(copy):
    data = copy()
    meta = data / FOLDER / "metadata" / "1.npy"
    lines = meta.read_bytes().split(b"\n")
    meta.write_bytes(b"\n".join(lines[:2] + [b"\x89PNG\r\n\x1a\n binary"] + lines[3:]))
    offset = len(lines[0]) + len(lines[1]) + 2  # line 3 starts with 0x89, which UTF-8 never starts with
    with pytest.raises(DataFormatError, match=rf"metadata/1\.npy:3: byte {offset} is b'\\x89', not text.*"
                                              "prepare_data.py pathfinder"):
        PathfinderDataModule(str(data)).setup()


def test_generated_folder_is_regenerated_when_its_settings_differ(tmp_path):
    dm = PathfinderDataModule(str(tmp_path), generate=True, generate_count=6)
    dm.setup()
    assert json.loads((tmp_path / FOLDER / "generator.json").read_text())["count"] == 6
    more = PathfinderDataModule(str(tmp_path), generate=True, generate_count=10)
    more.setup()
    assert sum(len(more.splits[s]["label"]) for s in ("train", "val", "test")) == 10
    reseeded = PathfinderDataModule(str(tmp_path), generate=True, generate_count=10, generate_seed=1)
    reseeded.setup()
    assert not torch.equal(reseeded.rows("train")["input_ids"], more.rows("train")["input_ids"])


def test_distractors_are_a_generator_setting(tmp_path):
    dm = PathfinderDataModule(str(tmp_path), generate=True, generate_count=6, distractors=0)
    dm.setup()
    assert json.loads((tmp_path / FOLDER / "generator.json").read_text())["settings"]["num_distractors"] == 0
    release = PathfinderDataModule(str(tmp_path), generate=True, generate_count=6)
    release.setup()
    assert json.loads((tmp_path / FOLDER / "generator.json").read_text())["settings"]["num_distractors"] == 5
    fewer = (dm.rows("train")["input_ids"] > 1).sum()
    assert fewer < (release.rows("train")["input_ids"] > 1).sum(), "fewer snakes, less ink (the same seed)"
    with pytest.raises(OptionError, match="task.distractors"):
        PathfinderDataModule(str(tmp_path), distractors=-2)


def test_release_folder_without_manifest_is_used_and_never_replaced(copy):
    data = copy()
    (data / FOLDER / "generator.json").unlink()  # as the LRA release's folders are
    before = sorted(p.name for p in (data / FOLDER / "imgs").iterdir())
    dm = PathfinderDataModule(str(data), generate=True, generate_count=6)
    dm.setup()
    assert sum(len(dm.splits[s]["label"]) for s in ("train", "val", "test")) == 40
    assert sorted(p.name for p in (data / FOLDER / "imgs").iterdir()) == before
    with pytest.raises(DataFormatError, match="without generator.json .* never overwritten"):
        write_release(data, count=6, workers=1, progress=False)


def test_prepared_data_without_distractors_is_what_the_task_asks_for(tmp_path, capsys):
    from scripts.prepare_data import main as prepare_main

    assert prepare_main(["pathfinder", "--out", str(tmp_path), "--count", "6", "--difficulty", "easy",
                         "--distractors", "0", "--workers", "1"]) == 0
    manifest = tmp_path / "pathfinder32" / "curv_baseline" / "generator.json"
    written = manifest.stat().st_mtime_ns
    dm = PathfinderDataModule(str(tmp_path), difficulty="easy", distractors=0, generate=True, generate_count=6)
    dm.setup()
    assert manifest.stat().st_mtime_ns == written, "the prepared folder is used, not generated again"
    assert sum(len(dm.splits[s]["label"]) for s in ("train", "val", "test")) == 6
    with pytest.raises(SystemExit) as refused:
        prepare_main(["pathfinder", "--out", str(tmp_path), "--distractors", "-1"])
    assert refused.value.code == 2 and "--distractors: '-1' is not a whole number" in capsys.readouterr().err
