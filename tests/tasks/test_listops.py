"""ListOps: the generator follows LRA's procedure, the reader reads the release layout exactly."""

from __future__ import annotations

import json
import logging
import statistics

import pytest
import torch

from scripts.prepare_data import main as prepare_main
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


HEADER = "Source\tTarget\n"
ROWS = "( ( ( [MAX 4 ) 3 ) ] )\t4\n( [SM 9 ( ( 8 ) ] ) )\t7\n"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROWS).encode())
    assert read_tsv(path) == (["( ( ( [MAX 4 ) 3 ) ] )", "( [SM 9 ( ( 8 ) ] ) )"], [4, 7])


@pytest.mark.parametrize("garbage,line,offset", [
    (b"\x1f\x8b\x08\x00binary", 4, 64),              # gzip bytes after two good lines
    (b"( [MAX 1 \xff ] )\t1", 4, 72),                # one byte that is not UTF-8 inside an expression
])
def test_binary_bytes_name_the_file_line_byte_and_fix(tmp_path, garbage, line, offset):
    path = tmp_path / "basic_val.tsv"
    path.write_bytes((HEADER + ROWS).encode() + garbage + b"\n")
    with pytest.raises(DataFormatError, match=rf"basic_val\.tsv:{line}: byte {offset} .*not UTF-8.*prepare_data\.py listops"):
        read_tsv(path)


GENERATE = dict(max_length=64, generate=True, num_train=20, num_val=4, num_test=4, min_tree_length=5,
                max_tree_length=40, max_depth=4)


def tsv_bytes(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "listops-1000").glob("*.tsv"))}


def test_generated_data_depend_on_generate_seed_not_on_the_training_seed(tmp_path):
    for seed in (1, 2):
        ListOpsDataModule(str(tmp_path / f"seed{seed}"), seed=seed, **GENERATE).prepare_data()
    ListOpsDataModule(str(tmp_path / "other"), seed=1, generate_seed=1, **GENERATE).prepare_data()
    assert tsv_bytes(tmp_path / "seed1") == tsv_bytes(tmp_path / "seed2")
    assert tsv_bytes(tmp_path / "seed1") != tsv_bytes(tmp_path / "other")


def test_changed_generator_settings_regenerate_the_folder(tmp_path):
    ListOpsDataModule(str(tmp_path), **GENERATE).setup()
    manifest = json.loads((tmp_path / "listops-1000" / "generator.json").read_text())
    assert manifest["sizes"] == {"train": 20, "val": 4, "test": 4} and manifest["seed"] == 0
    bigger = ListOpsDataModule(str(tmp_path), **dict(GENERATE, num_train=30, max_tree_length=50))
    bigger.setup()
    assert len(bigger.splits["train"]["label"]) == 30
    assert json.loads((tmp_path / "listops-1000" / "generator.json").read_text())["max_length"] == 50
    reseeded = ListOpsDataModule(str(tmp_path), **dict(GENERATE, num_train=30, max_tree_length=50, generate_seed=3))
    reseeded.setup()
    assert not torch.equal(reseeded.splits["train"]["input_ids"], bigger.splits["train"]["input_ids"])


def test_release_data_without_manifest_is_used_and_never_rewritten(tmp_path):
    folder = tmp_path / "lra_release" / "listops-1000"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text(HEADER + ROWS)
    before = tsv_bytes(folder.parent)
    dm = ListOpsDataModule(str(tmp_path), **GENERATE)
    dm.setup()
    assert dm.splits["train"]["label"].tolist() == [4, 7]
    assert tsv_bytes(folder.parent) == before and not (folder / "generator.json").exists()
    with pytest.raises(DataFormatError, match="without generator.json .* never overwritten"):
        gen.write_release(folder.parent, {"train": 4, "val": 1, "test": 1}, min_length=5, max_length=40,
                          workers=1, progress=False)
    assert tsv_bytes(folder.parent) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings,named", [
    (dict(min_tree_length=500, max_tree_length=2000, max_depth=5), "task.min_tree_length=500"),
    (dict(min_tree_length=40, max_tree_length=40, max_depth=4), "task.max_tree_length=40"),
    (dict(min_tree_length=0, max_tree_length=2000, max_depth=0), "task.max_depth=0"),
])
def test_infeasible_settings_fail_at_once_naming_the_setting(tmp_path, settings, named):
    with pytest.raises(ValueError, match=named):
        ListOpsDataModule(str(tmp_path), **dict(GENERATE, **settings)).setup()
    assert not (tmp_path / "listops-1000").exists()


def test_keep_probability_is_exact():
    """A tree of max_depth 2 is a digit (length 1, p 0.75) or an operator over k = 2..3 digits
    (length k + 2, p 0.25 / 2 each)."""
    assert gen.keep_probability(0, 10, max_depth=2, max_args=3) == pytest.approx(1.0)
    assert gen.keep_probability(1, 10, max_depth=2, max_args=3) == pytest.approx(0.25)
    assert gen.keep_probability(4, 10, max_depth=2, max_args=3) == pytest.approx(0.125)
    assert gen.keep_probability(5, 10, max_depth=2, max_args=3) == 0


@pytest.mark.timeout(60)
def test_too_few_distinct_trees_fail_instead_of_looping():
    with pytest.raises(ValueError, match="only 10 distinct trees"):
        gen.generate(20, min_length=0, max_length=2, max_depth=3, workers=1, progress=False)


CLI = ["--num-train", "6", "--num-val", "2", "--num-test", "2", "--min-length", "5", "--max-length", "40",
       "--workers", "1"]


@pytest.mark.timeout(60)
def test_prepare_refuses_infeasible_lengths_in_one_line(tmp_path, capsys):
    assert prepare_main(["listops", "--out", str(tmp_path), "--min-length", "500", "--max-depth", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--min-length=500" in err and "--max-depth=5" in err
    assert not (tmp_path / "listops-1000").exists()


def test_prepare_keeps_current_data_and_never_overwrites_release_data(tmp_path, capsys):
    assert prepare_main(["listops", "--out", str(tmp_path / "gen"), *CLI]) == 0
    written = tsv_bytes(tmp_path / "gen")
    assert prepare_main(["listops", "--out", str(tmp_path / "gen"), *CLI]) == 0
    assert "already exists with these settings" in capsys.readouterr().out
    assert prepare_main(["listops", "--out", str(tmp_path / "gen"), *CLI, "--seed", "1"]) == 0
    assert tsv_bytes(tmp_path / "gen") != written, "other settings regenerate the folder"

    release = tmp_path / "release" / "listops-1000"
    release.mkdir(parents=True)
    (release / "basic_train.tsv").write_text(HEADER + ROWS)
    capsys.readouterr()
    assert prepare_main(["listops", "--out", str(release.parent), *CLI]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "without generator.json" in err
    assert (release / "basic_train.tsv").read_text() == HEADER + ROWS and len(list(release.iterdir())) == 1


def test_release_data_with_generate_on_is_announced_once(tmp_path, caplog):
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text(HEADER + ROWS)
    with caplog.at_level(logging.WARNING, logger="tasks.base"):
        ListOpsDataModule(str(tmp_path), **GENERATE).setup()
    assert [r.getMessage().count("has no generator.json") for r in caplog.records] == [1]
