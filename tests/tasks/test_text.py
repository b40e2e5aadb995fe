"""Text: IMDb in the Hugging Face hub's layout becomes byte ids (b + 1), validated on test by default."""

from __future__ import annotations

import sys
import types

import datasets
import pytest
import torch

from scripts.prepare_data import main as prepare_main
from tasks import sources
from tasks.base import DataFormatError, DataNotFoundError, byte_ids
from tasks.text import TextDataModule
from tests.helpers.hub import IMDB_FEATURES, IMDB_TRAIN, imdb_dict


@pytest.fixture
def parquet_dir(tmp_path):
    """The hub's file layout: plain_text/{train,test,unsupervised}-00000-of-00001.parquet."""
    folder = tmp_path / "text" / "plain_text"
    folder.mkdir(parents=True)
    for split, dataset in imdb_dict().items():
        dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"text": ["unlabelled"], "label": [-1]}).to_parquet(
        str(folder / "unsupervised-00000-of-00001.parquet")
    )
    return tmp_path / "text"


def expected_ids(text: str, n: int) -> list[int]:
    ids = [b + 1 for b in text.encode("utf-8")][:n]
    return ids + [0] * (n - len(ids))


def decode(ids: torch.Tensor) -> set[str]:
    return {bytes(i - 1 for i in row if i).decode() for row in ids.tolist()}


def test_byte_ids_shift_truncate_and_pad():
    ids = byte_ids([b"ab", b"\xff\x00xyz"], 4)
    assert ids.tolist() == [[98, 99, 0, 0], [256, 1, 121, 122]]
    assert ids.dtype == torch.int16, "the cache keeps compact ids"


def test_parquet_layout_gives_byte_ids_labels_and_test_as_validation(parquet_dir):
    dm = TextDataModule(str(parquet_dir), max_length=12, batch_size=4)
    dm.setup()
    train, val, test = dm.rows("train"), dm.rows("val"), dm.rows("test")
    assert train["input_ids"].shape == (8, 12) and train["input_ids"].dtype == torch.long
    assert train["input_ids"][2].tolist() == expected_ids("café crème", 12)  # é is two bytes
    assert train["input_ids"][1].tolist() == expected_ids('A "so-called" classic<br />', 12)
    assert train["mask"][3].tolist() == [True] * 3 + [False] * 9
    assert train["label"].tolist() == IMDB_TRAIN["label"]
    assert dm.splits["val"] is dm.splits["test"], "LRA validates on the test split; one tensor serves both"
    assert test["label"].tolist() == [1, 0, 0]
    assert torch.equal(val["input_ids"], test["input_ids"]) and torch.equal(val["label"], test["label"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "mask", "label"} and batch["input_ids"].shape == (4, 12)
    assert dm.vocab_size == 257 and dm.num_classes == 2 and not dm.is_pair


def test_save_to_disk_layout_reads_the_same(parquet_dir, tmp_path):
    imdb_dict().save_to_disk(str(tmp_path / "saved" / "hf_dataset"))
    a = TextDataModule(str(parquet_dir), max_length=16)
    b = TextDataModule(str(tmp_path / "saved"), max_length=16)
    for split in ("train", "test"):
        assert torch.equal(a.build_split(split)["input_ids"], b.build_split(split)["input_ids"])


def test_validation_fraction_holds_out_a_fixed_part_of_train(parquet_dir):
    dm = TextDataModule(str(parquet_dir), max_length=32, val_split=0.25)
    dm.setup()
    train, val = decode(dm.rows("train")["input_ids"]), decode(dm.rows("val")["input_ids"])
    assert len(train) == 6 and len(val) == 2 and not train & val
    assert train | val == set(IMDB_TRAIN["text"])
    again = TextDataModule(str(parquet_dir), max_length=32, val_split=0.25, seed=5)
    assert torch.equal(again.build_split("val")["input_ids"], dm.rows("val")["input_ids"])


def test_cache_is_reused_and_keyed_by_settings(parquet_dir, monkeypatch):
    TextDataModule(str(parquet_dir), max_length=12).setup()
    cached = sorted(p.name for p in (parquet_dir / "cache").glob("*.pt"))
    assert len(cached) == 2, "train and test only: validation reuses the test tensors"
    again = TextDataModule(str(parquet_dir), max_length=12)
    monkeypatch.setattr(again, "build_split", lambda split: pytest.fail("cached tensors should be reused"))
    again.setup()
    assert again.cache_path("train") != TextDataModule(str(parquet_dir), max_length=10).cache_path("train")


def test_a_replaced_or_added_parquet_file_rebuilds_the_cache(parquet_dir):
    TextDataModule(str(parquet_dir), max_length=12).setup()
    folder = parquet_dir / "plain_text"
    datasets.Dataset.from_dict({"text": ["Brand new"], "label": [0]}, features=IMDB_FEATURES).to_parquet(
        str(folder / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"text": ["Second shard"], "label": [1]}, features=IMDB_FEATURES).to_parquet(
        str(folder / "train-00001-of-00002.parquet"))
    again = TextDataModule(str(parquet_dir), max_length=12)
    again.setup()
    assert decode(again.rows("test")["input_ids"]) == {"Brand new"}
    assert decode(again.rows("train")["input_ids"]) == {t[:12] for t in IMDB_TRAIN["text"]} | {"Second shard"}


def test_missing_data_names_the_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="(?s)Text: no IMDb 'train' split under .*"
                       "prepare_data.py text --out .*huggingface.co/datasets/"):
        TextDataModule(str(tmp_path / "nowhere"), max_length=8).setup()


def test_non_string_text_is_a_format_error(tmp_path):
    folder = tmp_path / "plain_text"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": [None], "label": [0]}).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001.parquet.*'text'"):
        TextDataModule(str(tmp_path), max_length=8).build_split("train")


def test_bad_options_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="source=.* set task.source in configs/task/text.yaml"):
        TextDataModule(str(tmp_path), source="tensorflow")
    with pytest.raises(ValueError, match="set task.val_split in"):
        TextDataModule(str(tmp_path), val_split="dev")


def test_tfds_source_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"\.\[tfds\]"):
        TextDataModule(str(tmp_path), max_length=8, source="tfds").build_split("train")


def test_tfds_source_reads_supervised_pairs(tmp_path, monkeypatch):
    calls = []

    def load(name, split, data_dir, download, as_supervised):
        calls.append((name, split, download, as_supervised))
        return [(b"good", 1), (b"bad", 0)]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=iter))
    dm = TextDataModule(str(tmp_path), max_length=6, source="tfds")
    with pytest.raises(DataNotFoundError, match="--source tfds"):
        dm.build_split("train")
    (tmp_path / "tfds" / "imdb_reviews").mkdir(parents=True)
    out = dm.build_split("train")
    assert out["input_ids"][0].tolist() == expected_ids("good", 6) and out["label"].tolist() == [1, 0]
    assert calls == [("imdb_reviews", "train", False, True)]


def test_prepare_saves_the_hub_data_set_where_the_task_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "probe_hub", lambda name: None)  # the hub answers
    monkeypatch.setattr(datasets, "load_dataset", lambda name, cache_dir: imdb_dict())
    out = tmp_path / "text"
    assert prepare_main(["text", "--out", str(out)]) == 0
    assert (out / "hf_dataset" / "dataset_dict.json").exists()
    assert f"task.data_dir={out}" in capsys.readouterr().out
    dm = TextDataModule(str(out), max_length=8)
    dm.setup()
    assert dm.splits["train"]["label"].tolist() == IMDB_TRAIN["label"]


def test_prepare_offline_prints_one_line_with_what_to_fetch(tmp_path, monkeypatch, capsys):
    def offline(name, cache_dir):
        raise ConnectionError("Couldn't reach 'stanfordnlp/imdb' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources, "probe_hub", lambda name: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prepare_main(["text", "--out", str(tmp_path / "text")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "https://huggingface.co/datasets/stanfordnlp/imdb" in err and str(tmp_path / "text") in err


def test_a_damaged_parquet_file_names_itself_and_the_command(parquet_dir):
    path = parquet_dir / "plain_text" / "train-00000-of-00001.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataFormatError, match=r"train-00000-of-00001\.parquet: cannot read IMDb's 'train' split.*"
                                              r"prepare_data\.py text --out"):
        TextDataModule(str(parquet_dir), max_length=8).build_split("train")


def test_text_that_is_not_utf8_names_the_row_and_byte(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "plain_text"
    folder.mkdir()
    text = pa.array([b"fine", b"caf\xe9 latin-1"], type=pa.binary()).view(pa.string())  # unchecked bytes
    pq.write_table(pa.table({"text": text, "label": [0, 1]}), folder / "train-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match=r"parquet: row 1: field 'text' is not UTF-8 text \(.* at byte 3\)"):
        TextDataModule(str(tmp_path), max_length=8).build_split("train")


def test_a_damaged_save_to_disk_copy_names_its_folder(tmp_path):
    saved = tmp_path / "hf_dataset"
    imdb_dict().save_to_disk(str(saved))
    next((saved / "train").glob("*.arrow")).write_bytes(b"\x00\x01 not arrow" * 10)
    with pytest.raises(DataFormatError, match=rf"{saved}: cannot read IMDb's 'train' split.*prepare_data\.py text"):
        TextDataModule(str(tmp_path), max_length=8).build_split("train")


def test_a_bad_label_names_its_row(tmp_path):
    folder = tmp_path / "plain_text"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 7]}).to_parquet(
        str(folder / "train-00000-of-00001.parquet"))
    with pytest.raises(DataFormatError, match=r"parquet: row 2: field 'label' holds 7"):
        TextDataModule(str(tmp_path), max_length=8).build_split("train")
