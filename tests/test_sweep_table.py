"""configs/sweep/table.yaml: every mechanism in configs/attention x 3 seeds x the CPU protocols."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, compose_train

EXPERIMENTS = ["quickstart", "mini/listops", "mini/pathfinder"]


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


def test_report_keeps_the_protocols_of_one_task_apart(tmp_path):
    from cast.app.reporting import collect, lra_table
    from cast.app.results import write_results

    for i, (experiment, acc) in enumerate([("quickstart", 0.35), ("mini/listops", 0.3), ("lra/listops", 0.37)]):
        run = tmp_path / str(i)
        write_results(run, {"task": "listops", "attention": "vanilla", "attention_options": {}, "seed": 0,
                            "val_acc_best": acc, "test_acc": acc, "params": 1, "steps": 1, "wall_time_s": 1.0,
                            "samples_per_s": 1.0, "peak_mem_mb": 1.0, "status": "ok"})
        choices = {"task": "listops", "attention": "vanilla", "experiment": experiment}
        (run / ".hydra").mkdir()
        OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run / ".hydra" / "hydra.yaml")
    runs = collect([tmp_path])
    assert sorted(r.task for r in runs) == ["listops", "mini/listops", "quickstart"]
    table = lra_table(runs, paper=False)
    (row,) = table.rows
    cells = dict(zip(table.keys, row.cells))
    assert (cells["quickstart"].mean, cells["mini/listops"].mean, cells["listops"].mean) == (35.0, 30.0, 37.0)
