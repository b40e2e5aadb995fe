"""cast/run.py pieces that need no training: the trainer evaluate() builds."""

from __future__ import annotations

from lightning.pytorch.strategies import SingleDeviceStrategy

from cast.app.run import eval_trainer
from tests.conftest import compose_train


def test_evaluate_tests_a_ddp_run_on_one_device_without_a_distributed_sampler(tmp_path):
    # trainer=ddp as trained (accelerator cpu so that it builds on any machine).
    cfg = compose_train(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                   "trainer.precision=32-true"])
    assert (cfg.trainer.strategy, cfg.trainer.use_distributed_sampler) == ("ddp", True)
    trainer = eval_trainer(cfg.trainer, tmp_path / "eval")
    assert isinstance(trainer.strategy, SingleDeviceStrategy)
    assert (trainer.world_size, trainer.num_devices, trainer.num_nodes) == (1, 1, 1)
    assert trainer.strategy.launcher is None  # no second process is started
    assert not trainer._accelerator_connector.use_distributed_sampler
    assert trainer.precision == cfg.trainer.precision
