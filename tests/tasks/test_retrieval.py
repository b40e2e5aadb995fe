"""Retrieval: the release's AAN TSV files, read exactly (quotes plain, `1.0` labels), as byte-id pairs."""

from __future__ import annotations

import pytest
import torch

from tasks.base import DataFormatError, DataNotFoundError
from tasks.retrieval import RetrievalDataModule, read_tsv
from tests.helpers.aan import ROWS, write_release

def ids_of(text: bytes, n: int) -> list[int]:
    ids = [b + 1 for b in text[:n]]
    return ids + [0] * (n - len(ids))


def test_release_rows_become_byte_id_pairs(tmp_path):
    write_release(tmp_path)
    dm = RetrievalDataModule(str(tmp_path), max_length=10, batch_size=4)
    dm.setup()
    train = dm.rows("train")
    assert set(train) == {"input_ids", "mask", "input_ids_2", "mask_2", "label"}
    assert train["input_ids"].shape == train["input_ids_2"].shape == (4, 10)
    assert train["input_ids"].dtype == train["input_ids_2"].dtype == train["label"].dtype == torch.long
    assert train["label"].tolist() == [1, 0, 1, 0]
    assert train["input_ids"][0].tolist() == ids_of(b'We cite "prior', 10)  # the quote is a plain byte
    assert train["input_ids_2"][1].tolist() == ids_of(b"A 'quoted' caf\xc3\xa9 text", 10)
    assert train["input_ids"][2].tolist() == [ord('"') + 1] + [0] * 9
    assert train["mask"][3].tolist() == [True] * 5 + [False] * 5
    assert train["mask_2"][3].all(), "the second document is truncated to max_length"
    assert dm.splits["val"]["label"].tolist() == [0, 1], "val is the release's eval file"
    assert len(dm.splits["test"]["label"]) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids_2"].shape == (4, 10) and batch["mask_2"].dtype == torch.bool
    assert dm.is_pair and dm.vocab_size == 257 and dm.num_classes == 2


def test_windows_line_endings_and_blank_lines(tmp_path):
    folder = write_release(tmp_path, newline=b"\r\n")
    path = folder / "new_aan_pairs.test.tsv"
    path.write_bytes(path.read_bytes() + b"\r\n")
    first, second, labels = read_tsv(path)
    assert first == [b"one", b"three", b"five"] and second == [b"two", b"four", b"six"] and labels == [1, 0, 1]


@pytest.mark.parametrize(
    "bad_row",
    [b"1\tid1\tid2\tonly four fields", b"yes\tid1\tid2\ta\tb", b"2\tid1\tid2\ta\tb", b"1\ta\tb\tc\td\textra tab"],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_row):
    rows = dict(ROWS, train=ROWS["train"][:2] + [bad_row])
    write_release(tmp_path, rows)
    with pytest.raises(DataFormatError, match=r"new_aan_pairs\.train\.tsv:3 \(byte \d+\): expected 5 tab-separated fields"):
        RetrievalDataModule(str(tmp_path), max_length=8).setup()


def test_missing_release_names_the_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="prepare_data.py lra_release --out"):
        RetrievalDataModule(str(tmp_path), max_length=8).setup()


def test_cache_is_reused_and_keyed_by_length(tmp_path, monkeypatch):
    write_release(tmp_path)
    RetrievalDataModule(str(tmp_path), max_length=8).setup()
    again = RetrievalDataModule(str(tmp_path), max_length=8)
    monkeypatch.setattr(again, "build_split", lambda split: pytest.fail("cached tensors should be reused"))
    again.setup()
    assert again.rows("train")["input_ids"].shape == (4, 8)
    longer = RetrievalDataModule(str(tmp_path), max_length=12)
    longer.setup()
    assert longer.rows("train")["input_ids"].shape == (4, 12)


def test_a_replaced_release_file_rebuilds_the_cache(tmp_path):
    folder = write_release(tmp_path)
    RetrievalDataModule(str(tmp_path), max_length=8).setup()
    (folder / "new_aan_pairs.test.tsv").write_bytes(b"0\tk\tl\tseven\teight\n")
    again = RetrievalDataModule(str(tmp_path), max_length=8)
    again.setup()
    assert again.rows("test")["input_ids"].tolist() == [ids_of(b"seven", 8)]


def test_a_byte_order_mark_is_accepted(tmp_path):
    folder = write_release(tmp_path)
    path = folder / "new_aan_pairs.test.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_tsv(path)[2] == [1, 0, 1]


def test_binary_file_names_the_line_byte_offset_and_fix(tmp_path):
    folder = write_release(tmp_path)
    path = folder / "new_aan_pairs.eval.tsv"
    good = b"0\ta\tb\tx\ty\n"
    path.write_bytes(good + b"\x1f\x8b\x08\x00\x00\x00binary\x00\xff\n")
    with pytest.raises(DataFormatError, match=rf"new_aan_pairs\.eval\.tsv:2 \(byte {len(good)}\): .*"
                                              "prepare_data.py lra_release"):
        read_tsv(path)
