"""Path-X (LRA): Pathfinder at 128 × 128 = 16,384 tokens; the Pathfinder datamodule under its own name.

It is reported in its own column, outside the five-task average (every model of the LRA paper
stayed at chance on it).
"""

from __future__ import annotations

from tasks.pathfinder import PathfinderDataModule


class PathXDataModule(PathfinderDataModule):
    name = "pathx"
    label, lra_average, report_column = "Path-X", False, 5

    def __init__(self, data_dir: str, max_length: int = 16384, resolution: int = 128, **kw):
        super().__init__(data_dir, max_length=max_length, resolution=resolution, **kw)
