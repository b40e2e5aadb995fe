"""Every task trains end to end through train() with two mechanisms, on fixtures in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydra.utils import get_class
from omegaconf import OmegaConf

from cast.app import registry
from cast.app.run import train
from tests.conftest import CONFIGS, TINY, compose_train
from tests.helpers.lra import write_every_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_every_task(tmp_path_factory.mktemp("data"))


def case(task: registry.Task) -> tuple[str, int, int, list[str]]:
    """(task, its length, batch size, two mechanisms): image tasks keep their config's pixel grid,
    the others a short sequence; past 4K tokens only efficient mechanisms and a batch of 2."""
    pair = get_class(task.target).is_pair
    grid = OmegaConf.load(CONFIGS / "task" / f"{task.name}.yaml").task.max_length
    length = grid if task.is_image else 32 if pair else 64
    long = length > 4096
    return task.name, length, 2 if long or pair else 4, ["cast", "fastmax"] if long else ["vanilla", "cast"]


# Every task the registry knows (a new one fails here until tests/helpers/lra.py writes its fixture), but
# ListOps, which tests/test_train.py runs end to end.
CASES = [case(t) for t in registry.tasks() if t.name != "listops"]


@pytest.mark.parametrize(
    "task,length,batch,attention",
    [(t, n, b, a) for t, n, b, mechanisms in CASES for a in mechanisms],
)
def test_fast_dev_run(data_dirs, tmp_path, task, length, batch, attention):
    data_dir = data_dirs[task]
    cfg = compose_train(tmp_path / "run", TINY + [
        f"task={task}", f"attention={attention}", f"task.data_dir={data_dir}", f"task.max_length={length}",
        f"task.batch_size={batch}", "trainer.fast_dev_run=true",
    ])
    results = train(cfg)
    assert results["status"] == "ok"
    assert results["task"] == task and results["attention"] == attention
    assert 0.0 <= results["test_acc"] <= 1.0
