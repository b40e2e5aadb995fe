"""What every task shares: the epoch shuffle (sharded over ranks, exact mid-epoch resume)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DistributedSampler

from tasks.base import LRADataModule
from tasks.samplers import EpochShuffleSampler


class Rows(LRADataModule):
    """n rows whose ids are their own row numbers, so batches show which rows they hold."""

    name = "rows"

    def __init__(self, n: int, batch_size: int, tmp_path):
        super().__init__(str(tmp_path), max_length=1, batch_size=batch_size, seed=7)
        ids = torch.arange(n)[:, None]
        self.splits = {split: {"input_ids": ids, "label": ids[:, 0] % 2} for split in ("train", "val", "test")}


def fake_trainer(world: int, rank: int, epoch: int = 0, batches_done: int = 0):
    progress = SimpleNamespace(current=SimpleNamespace(completed=batches_done, processed=batches_done))
    return SimpleNamespace(world_size=world, global_rank=rank, current_epoch=epoch,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def epoch_batches(dm: LRADataModule, epoch: int) -> list[list[int]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [batch["input_ids"][:, 0].tolist() for batch in loader]


def test_ranks_split_one_permutation_and_pad_to_equal_length():
    shards = [list(EpochShuffleSampler(11, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(s) for s in shards] == [6, 6]
    whole = list(EpochShuffleSampler(11, seed=3))
    interleaved = [i for pair in zip(*shards) for i in pair]
    assert interleaved == whole + whole[:1]  # one row repeated, as DistributedSampler pads
    # Lightning leaves a DistributedSampler in place instead of wrapping it in its own.
    assert isinstance(EpochShuffleSampler(11, seed=3), DistributedSampler)


def test_mid_epoch_resume_under_two_ranks_gives_each_rank_the_rest_of_its_shard(tmp_path):
    n, batch, done, epoch = 22, 2, 3, 1
    straight, following = {}, {}
    for rank in (0, 1):
        dm = Rows(n, batch, tmp_path)
        dm.trainer = fake_trainer(2, rank)
        straight[rank], following[rank] = epoch_batches(dm, epoch), epoch_batches(dm, epoch + 1)
        assert len(straight[rank]) == 6

    # Both ranks stopped after `done` batches of epoch 1; the checkpoint holds rank 0's state.
    crashed = Rows(n, batch, tmp_path)
    crashed.trainer = fake_trainer(2, 0, epoch=epoch, batches_done=done)
    state = crashed.state_dict()
    assert state == {"epoch": epoch, "samples_done": done * batch * 2}  # all ranks' samples

    for rank in (0, 1):
        resumed = Rows(n, batch, tmp_path)
        resumed.load_state_dict(state)
        resumed.trainer = fake_trainer(2, rank, epoch=epoch)
        loader = resumed.train_dataloader()
        assert len(loader) == len(straight[rank])  # the epoch's length, as Lightning counts it
        assert epoch_batches(resumed, epoch) == straight[rank][done:]
        assert epoch_batches(resumed, epoch + 1) == following[rank]  # later epochs are whole again


def test_resume_with_another_world_size_skips_exactly_the_rows_seen(tmp_path):
    n, batch, done, epoch = 24, 2, 2, 0
    seen = set()
    for rank in (0, 1):
        dm = Rows(n, batch, tmp_path)
        dm.trainer = fake_trainer(2, rank)
        seen |= {i for b in epoch_batches(dm, epoch)[:done] for i in b}
    dm.trainer = fake_trainer(2, 0, epoch=epoch, batches_done=done)
    state = dm.state_dict()
    rest = []
    for rank in range(4):
        resumed = Rows(n, batch, tmp_path)
        resumed.load_state_dict(state)
        resumed.trainer = fake_trainer(4, rank, epoch=epoch)
        rest += [i for b in epoch_batches(resumed, epoch) for i in b]
    assert sorted(rest) == sorted(set(range(n)) - seen)


def test_one_process_resume_matches_the_uninterrupted_epoch(tmp_path):
    dm = Rows(10, 3, tmp_path)
    straight = epoch_batches(dm, 0)
    resumed = Rows(10, 3, tmp_path)
    resumed.load_state_dict({"epoch": 0, "samples_done": 3})
    assert epoch_batches(resumed, 0) == straight[1:]


def test_evaluation_under_ranks_counts_every_row_exactly_once(tmp_path):
    """Lightning's DistributedSampler pads val/test shards by repeating rows; ours never does."""
    rows = {}
    for rank in (0, 1, 2):
        dm = Rows(11, 2, tmp_path)
        dm.eval_batch_size = 2
        dm.trainer = fake_trainer(3, rank)
        for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
            assert isinstance(loader.sampler, DistributedSampler)  # left in place by Lightning
            rows.setdefault(split, []).extend(i for b in loader for i in b["input_ids"][:, 0].tolist())
    for split in ("val", "test"):
        assert sorted(rows[split]) == list(range(11)), split
    single = Rows(11, 2, tmp_path)
    assert single.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"


def test_find_path_takes_the_shallowest_match_and_never_lists_below_its_level(tmp_path, monkeypatch):
    from tasks import base

    for folder in ("b/x/data", "a/x/data", "c/deep/x/data", "a/x/data/imgs/0"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "b" / "x" / "data" / "f.txt").write_text("")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(base.os, "scandir", lambda p: listed.append(Path(p)) or real_scandir(p))
    assert base.find_path(tmp_path, "x/data") == tmp_path / "a" / "x" / "data"  # ties go by name
    assert tmp_path / "a" / "x" / "data" not in listed and tmp_path / "c" / "deep" not in listed
    assert base.find_path(tmp_path, "x/data/f.txt") == tmp_path / "b" / "x" / "data" / "f.txt"
    assert base.find_path(tmp_path, "deep/x") == tmp_path / "c" / "deep" / "x"
    assert base.find_path(tmp_path, "nowhere") is None
    (tmp_path / "c" / "loop").symlink_to(tmp_path)  # a cycle must not hang the search
    assert base.find_path(tmp_path, "nowhere") is None
