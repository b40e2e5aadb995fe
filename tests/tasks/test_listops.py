"""ListOps: the generator follows LRA's procedure, the reader reads the release layout exactly."""

from __future__ import annotations

import statistics

import pytest
import torch

from tasks import listops_generator as gen
from tasks.base import DataFormatError, DataNotFoundError
from tasks.listops import VOCAB, ListOpsDataModule, encode, read_tsv


def evaluate(source: str) -> tuple[int, int, int]:
    """Independent evaluator: a stack machine over the tokens (parentheses ignored).

    Returns (value, LRA length, depth) and checks every operator has 2..10 arguments.
    """
    stack: list[tuple[str, list[int]]] = []
    value = None
    length = depth = 0
    for tok in source.split():
        if tok in "()":
            continue
        length += 1
        if tok.startswith("["):
            stack.append((tok, []))
            depth = max(depth, len(stack))
        elif tok == "]":
            op, args = stack.pop()
            assert 2 <= len(args) <= 10, f"{op} has {len(args)} arguments"
            result = {
                "[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(statistics.median(a)),
            }[op](args)
            if stack:
                stack[-1][1].append(result)
            else:
                value = result
        else:
            digit = int(tok)
            if stack:
                stack[-1][1].append(digit)
            else:
                value = digit
    assert not stack, "unbalanced expression"
    return value, length, depth + 1


def test_generated_labels_lengths_and_depth_are_correct():
    rows = gen.generate(300, seed=3, min_length=20, max_length=120, max_depth=6, workers=1, progress=False)
    assert len(rows) == 300
    assert len({s for s, _ in rows}) == 300, "duplicates must be dropped"
    for source, target in rows:
        value, length, depth = evaluate(source)
        assert value == target
        assert 20 < length < 120
        assert depth <= 6 + 1


def test_generator_defaults_match_lra_lengths():
    rows = gen.generate(20, seed=0, workers=1, progress=False)
    for source, target in rows:
        value, length, _ = evaluate(source)
        assert value == target and 500 < length < 2000


def test_generator_is_reproducible_and_independent_of_workers():
    kw = dict(min_length=10, max_length=80, max_depth=5, progress=False)
    a = gen.generate(1200, seed=7, workers=1, **kw)
    b = gen.generate(1200, seed=7, workers=2, **kw)
    c = gen.generate(1200, seed=8, workers=1, **kw)
    assert a == b
    assert a != c


def test_release_layout_round_trip(tmp_path):
    sizes = {"train": 30, "val": 5, "test": 7}
    folder = gen.write_release(tmp_path, sizes, seed=1, min_length=10, max_length=60, workers=1, progress=False)
    expected = gen.generate(42, seed=1, min_length=10, max_length=60, workers=1, progress=False)
    lines = (folder / "basic_train.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget"
    read = []
    for split, n in sizes.items():
        sources, targets = read_tsv(folder / f"basic_{split}.tsv")
        assert len(sources) == n
        read += list(zip(sources, targets))
    assert read == expected


def test_release_format_is_read_exactly(tmp_path):
    folder = tmp_path / "lra_release" / "lra_release" / "listops-1000"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text("Source\tTarget\n( ( ( [MAX 4 ) 3 ) ] )\t4\n( [SM 9 ( ( 8 ) ] ) )\t7\n")
    dm = ListOpsDataModule(str(tmp_path), max_length=8, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = dm.rows("train")
    ids = rows["input_ids"]
    assert ids[0].tolist() == [VOCAB.index("[MAX") + 1, 5, 4, VOCAB.index("]") + 1, 0, 0, 0, 0]
    assert rows["mask"][0].tolist() == [True] * 4 + [False] * 4
    assert dm.splits["train"]["input_ids"].dtype == torch.uint8, "the cache keeps compact ids"
    assert sorted(batch["label"].tolist()) == [4, 7]
    assert batch["input_ids"].dtype == torch.long and batch["mask"].dtype == torch.bool


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_text("Source\tTarget\n( [MAX 1 2 ] )\t2\n( [MIN 1 2 ] )\n")
    with pytest.raises(DataFormatError, match=r"basic_train.tsv:3"):
        read_tsv(path)
    path.write_text("Src\tTarget\n")
    with pytest.raises(DataFormatError, match=r"basic_train.tsv:1.*header"):
        read_tsv(path)


def test_missing_data_names_the_command(tmp_path):
    dm = ListOpsDataModule(str(tmp_path / "nowhere"), max_length=16)
    with pytest.raises(DataNotFoundError, match="prepare_data.py listops --out"):
        dm.setup()


def test_generate_on_first_use_and_cache_reuse(tmp_path, monkeypatch):
    kw = dict(max_length=64, generate=True, num_train=20, num_val=4, num_test=4, min_tree_length=5,
              max_tree_length=40, max_depth=4)
    dm = ListOpsDataModule(str(tmp_path), **kw)
    dm.setup()
    assert len(dm.splits["train"]["label"]) == 20
    assert (tmp_path / "listops-1000" / "basic_test.tsv").exists()
    assert list((tmp_path / "cache").glob("listops-train-*.pt"))

    def no_rebuild(split):
        raise AssertionError("the cached tensors should have been reused")

    again = ListOpsDataModule(str(tmp_path), **kw)
    monkeypatch.setattr(again, "build_split", no_rebuild)
    again.setup()
    assert torch.equal(again.splits["train"]["input_ids"], dm.splits["train"]["input_ids"])


def test_encode_drops_parentheses():
    assert encode("( ( [SM 1 ) 2 ) ] )") == [VOCAB.index("[SM") + 1, 2, 3, VOCAB.index("]") + 1]


def test_a_replaced_source_file_rebuilds_the_cache_and_a_deleted_one_keeps_it(tmp_path, monkeypatch):
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 4 3 ] )\t4\n")
    ListOpsDataModule(str(tmp_path), max_length=8).setup()
    (folder / "basic_train.tsv").write_text("Source\tTarget\n( [MIN 4 3 ] )\t3\n( [SM 9 8 ] )\t7\n")
    again = ListOpsDataModule(str(tmp_path), max_length=8)
    again.setup()
    assert again.splits["train"]["label"].tolist() == [3, 7]
    assert again.splits["val"]["label"].tolist() == [4]
    (folder / "basic_train.tsv").unlink()
    kept = ListOpsDataModule(str(tmp_path), max_length=8)
    monkeypatch.setattr(kept, "build_split", lambda split: pytest.fail("the cache must serve deleted sources"))
    kept.setup()
    assert kept.splits["train"]["label"].tolist() == [3, 7]
