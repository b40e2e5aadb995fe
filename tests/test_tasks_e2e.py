"""Every task trains end to end through train() with two mechanisms, on fixtures in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from cast.app.run import train
from tasks.pathfinder_generator import write_release as write_pathfinder
from tests.conftest import TINY, compose_train
from tests.helpers.aan import write_release as write_aan
from tests.helpers.hub import cifar, imdb_dict

pytestmark = pytest.mark.slow


def hub_parquet(root: Path, dataset_dict) -> Path:
    folder = root / "plain_text"
    folder.mkdir(parents=True)
    for split, dataset in dataset_dict.items():
        dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    hub_parquet(root / "text", imdb_dict())
    hub_parquet(root / "image", cifar(n_train=20, n_test=4))
    write_aan(root)
    write_pathfinder(root / "pathfinder", count=40, seed=0, workers=1, progress=False)
    write_pathfinder(root / "pathx", resolution=128, count=10, seed=0, workers=1, progress=False)
    return root


# (task, its length, batch size), each with two mechanisms; Path-X with efficient ones only.
CASES = [
    ("text", 64, 4, ["vanilla", "cast"]),
    ("retrieval", 32, 2, ["vanilla", "cast"]),
    ("image", 1024, 4, ["vanilla", "cast"]),
    ("pathfinder", 1024, 4, ["vanilla", "cast"]),
    ("pathx", 16384, 2, ["cast", "fastmax"]),
]


@pytest.mark.parametrize(
    "task,length,batch,attention",
    [(t, n, b, a) for t, n, b, mechanisms in CASES for a in mechanisms],
)
def test_fast_dev_run(data_root, tmp_path, task, length, batch, attention):
    data_dir = data_root if task == "retrieval" else data_root / task
    cfg = compose_train(tmp_path / "run", TINY + [
        f"task={task}", f"attention={attention}", f"task.data_dir={data_dir}", f"task.max_length={length}",
        f"task.batch_size={batch}", "trainer.fast_dev_run=true",
    ])
    results = train(cfg)
    assert results["status"] == "ok"
    assert results["task"] == task and results["attention"] == attention
    assert 0.0 <= results["test_acc"] <= 1.0
