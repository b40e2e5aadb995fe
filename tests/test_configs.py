"""Configs never rot: every task and experiment composes, and the LRA presets match the protocol."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from cast.app import registry
from tests.conftest import CONFIGS, compose_train

TASKS = [t.name for t in registry.tasks()]
PRESETS = sorted(registry.lra_presets())
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml"))

# lra.md, "Protocol": layers, heads, emb, mlp, batch, lr, weight decay, pooling (Path-X: the LRA
# repository's pathfinder128 config). The oracle the presets are checked against, kept by hand.
PROTOCOL = {
    "listops": (4, 8, 512, 1024, 32, 0.05, 0.1, "cls"),
    "text": (4, 4, 256, 1024, 32, 0.05, 0.1, "cls"),
    "retrieval": (4, 4, 128, 512, 32, 0.05, 0.1, "cls"),
    "image": (1, 8, 128, 128, 256, 5e-4, 0.0, "cls"),
    "pathfinder": (4, 4, 32, 32, 512, 1e-3, 0.0, "mean"),
    "pathx": (1, 2, 32, 32, 64, 1e-3, 0.0, "mean"),
}


def test_the_registry_knows_every_task_config_and_reads_its_facts_from_the_class():
    assert sorted(TASKS) == sorted(p.stem for p in (CONFIGS / "task").glob("*.yaml"))
    assert TASKS[:6] == ["listops", "text", "retrieval", "image", "pathfinder", "pathx"]  # the LRA paper's order
    facts = {t.name: (t.label, t.lra_average, t.is_image) for t in registry.tasks()}
    assert facts["pathx"] == ("Path-X", False, True) and facts["listops"] == ("ListOps", True, False)
    assert [t for t, (_, average, _) in facts.items() if average] == TASKS[:5]


def test_every_lra_preset_has_a_protocol_row_and_every_row_a_preset():
    assert set(PRESETS) == set(PROTOCOL)
    assert "quickstart" in EXPERIMENTS


@pytest.mark.parametrize("task", TASKS)
def test_task_config_composes_and_its_class_exists(task, tmp_path):
    cfg = compose_train(tmp_path, [f"task={task}"])
    OmegaConf.to_container(cfg, resolve=True)
    cls = get_class(cfg.task._target_)
    assert cls.name == task  # results.json's task is the config's name
    assert isinstance(cfg.num_clusters, int) and cfg.num_clusters >= 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("task", PRESETS)
def test_lra_presets_follow_the_protocol(task, tmp_path):
    if task not in PROTOCOL:
        pytest.fail(f"configs/experiment/lra/{task}.yaml has no row in PROTOCOL to check it against")
    cfg = compose_train(tmp_path, [f"experiment=lra/{task}"])
    layers, heads, emb, mlp, batch, lr, wd, pooling = PROTOCOL[task]
    m = cfg.model
    assert (m.n_layers, m.n_heads, m.d_model, m.mlp_dim, m.pooling) == (layers, heads, emb, mlp, pooling)
    assert (cfg.task.batch_size, cfg.optim.weight_decay) == (batch, wd)
    # optim.lr is the peak; LRA's rsqrt base rate peaks at base / sqrt(warmup).
    peak = lr / math.sqrt(cfg.optim.warmup_steps) if cfg.optim.schedule == "rsqrt" else lr
    assert math.isclose(cfg.optim.lr, peak, rel_tol=1e-12)
    assert get_class(cfg.task._target_).name == task


def test_cast_is_the_default_attention(tmp_path):
    cfg = compose_train(tmp_path, [])
    assert cfg.attention._target_.endswith("CASTAttention")


def test_num_clusters_flows_from_task_to_cast_and_cli_wins(tmp_path):
    if not Path(CONFIGS / "attention" / "cast.yaml").exists():
        pytest.fail("configs/attention/cast.yaml is missing")
    cfg = compose_train(tmp_path, ["task=listops", "attention=cast", "num_clusters=48"])
    assert cfg.attention.num_clusters == 48
    cfg = compose_train(tmp_path, ["attention=cast", "attention.num_clusters=7"])
    assert cfg.attention.num_clusters == 7
