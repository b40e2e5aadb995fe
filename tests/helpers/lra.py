"""Small data sets of every LRA task in the real file formats, in one folder, for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

from tasks.listops_generator import write_release as write_listops
from tasks.pathfinder_generator import write_release as write_pathfinder
from tests.helpers.aan import write_release as write_aan
from tests.helpers.hub import cifar, imdb_dict


def hub_parquet(root: Path, dataset_dict) -> Path:
    """A DatasetDict as the hub's parquet files (plain_text/<split>-00000-of-00001.parquet)."""
    folder = root / "plain_text"
    folder.mkdir(parents=True)
    for split, dataset in dataset_dict.items():
        dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return root


def small_listops(out: Path) -> Path:
    """A small generated ListOps set in the release layout (short trees, fixed seed)."""
    write_listops(out, {"train": 160, "val": 48, "test": 48}, seed=0, min_length=8, max_length=60, max_depth=4,
                  workers=1, progress=False)
    return out


def write_every_task(root: Path, pathfinder_count: int = 40, pathx_count: int = 10) -> dict[str, Path]:
    """Fixtures of each task under root; returns each task's task.data_dir."""
    small_listops(root / "listops")
    hub_parquet(root / "text", imdb_dict())
    hub_parquet(root / "image", cifar(n_train=20, n_test=4))
    write_aan(root)
    write_pathfinder(root / "pathfinder", count=pathfinder_count, seed=0, workers=1, progress=False)
    write_pathfinder(root / "pathx", resolution=128, count=pathx_count, seed=0, workers=1, progress=False)
    return {"listops": root / "listops", "text": root / "text", "image": root / "image", "retrieval": root,
            "pathfinder": root / "pathfinder", "pathx": root / "pathx"}
