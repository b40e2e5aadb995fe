"""configs/sweep/table.yaml: every mechanism in configs/attention x 3 seeds x the CPU protocols."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, compose_train

EXPERIMENTS = ["mini/quickstart", "mini/listops", "mini/pathfinder"]


def table_jobs() -> list[list[str]]:
    """The jobs `python train.py -m +sweep=table` launches, as the basic sweeper expands them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=["+sweep=table"], return_hydra_config=True)
        assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweep.dir.endswith("_table")
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    return jobs


def test_table_expands_to_every_mechanism_seed_and_protocol():
    mechanisms = sorted(p.stem for p in (CONFIGS / "attention").glob("*.yaml"))
    assert len(mechanisms) >= 7
    expected = [[f"experiment={e}", f"attention={a}", f"seed={s}"] for e in EXPERIMENTS for a in mechanisms
                for s in range(3)]
    assert sorted(table_jobs()) == sorted(expected)


def test_every_protocol_of_the_table_composes(tmp_path):
    for experiment in EXPERIMENTS:
        cfg = compose_train(tmp_path, ["+sweep=table", f"experiment={experiment}", "attention=cast", "seed=1"])
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg.task.generate and cfg.seed == 1


def write_run(run, experiment: str, acc: float, seed: int = 0, attention: str = "vanilla", wall: float = 1.0,
              majority: float = 0.2) -> None:
    from cast.app.results import write_results

    write_results(run, {"task": "listops", "attention": attention, "attention_options": {}, "seed": seed,
                        "val_acc_best": acc, "test_acc": acc, "test_majority_acc": majority, "params": 1, "steps": 1,
                        "wall_time_s": wall, "samples_per_s": 1.0, "peak_mem_mb": 1.0, "status": "ok"})
    choices = {"task": "listops", "attention": attention, "experiment": experiment}
    (run / ".hydra").mkdir()
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run / ".hydra" / "hydra.yaml")


def test_report_keeps_the_protocols_of_one_task_apart(tmp_path):
    from cast.app.reporting import collect, lra_table

    for i, (experiment, acc) in enumerate([("quickstart", 0.35), ("mini/listops", 0.3), ("lra/listops", 0.37)]):
        write_run(tmp_path / str(i), experiment, acc)
    runs = collect([tmp_path])
    assert sorted(r.task for r in runs) == ["listops", "mini/listops", "quickstart"]
    table = lra_table(runs, paper=False)
    row, majority = table.rows
    assert majority.label == "majority class" and majority.reference
    cells = dict(zip(table.keys, row.cells))
    assert (cells["quickstart"].mean, cells["mini/listops"].mean, cells["listops"].mean) == (35.0, 30.0, 37.0)


def test_a_table_of_cpu_protocols_has_their_columns_the_majority_class_and_wall_times(tmp_path):
    """No LRA task among the runs: no empty LRA columns, average or paper rows; the majority class
    is a row that never competes; the wall time table holds minutes per run."""
    from cast.app.reporting import collect, lra_table, time_table

    runs = [("mini/quickstart", "vanilla", 0, 0.34, 120.0, 0.172), ("mini/quickstart", "vanilla", 1, 0.36, 180.0, 0.172),
            ("mini/listops", "cast", 0, 0.30, 600.0, 0.219)]
    for i, (experiment, attention, seed, acc, wall, majority) in enumerate(runs):
        write_run(tmp_path / str(i), experiment, acc, seed, attention, wall, majority)
    collected = collect([tmp_path])
    table = lra_table(collected)
    assert table.keys == ["mini/listops", "mini/quickstart"] and table.columns == table.keys
    rows = {r.label: dict(zip(table.keys, r.cells)) for r in table.rows}
    assert list(rows) == ["vanilla", "cast", "majority class"]
    assert rows["vanilla"]["mini/quickstart"].mean == 35.0 and rows["vanilla"]["mini/listops"] is None
    assert rows["majority class"]["mini/quickstart"].mean == 17.2 and rows["majority class"]["mini/listops"].mean == 21.9
    marked = {table.rows[i].label for i, _ in table.marked()}
    assert marked == {"vanilla", "cast"}, "the majority class never wins a column"
    times = time_table(collected)
    cells = {r.label: dict(zip(times.keys, r.cells)) for r in times.rows}
    assert cells["vanilla"]["mini/quickstart"].mean == 2.5 and cells["cast"]["mini/listops"].mean == 10.0
    assert times.marked() == set()
