"""The LightningModule: loss, accuracy, optimiser and LRA learning-rate schedules.

It wraps a plain ``nn.Module`` that maps a batch dict to logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

SCHEDULES = ("rsqrt", "cosine", "constant")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` for optimiser step s = ``step``, counted from 0 as LRA counts.

    ``optim.lr`` is the peak rate in every schedule: each factor rises linearly to 1 over the
    ``warmup_steps`` (so step 0 has rate 0, as in LRA) and then decays.
    rsqrt: min(1, s/w) * sqrt(w / max(s, w)), LRA's text schedule base * min(1, s/w) / sqrt(max(s, w))
    with base = lr * sqrt(w): LRA's base rate 0.05 with 1000 warmup steps is lr 0.05/sqrt(1000) = 1.58e-3;
    cosine: min(1, s/w) * (1 + cos(pi * (s - w) / total)) / 2, LRA's cosine_decay with
    steps_per_cycle = the run's steps (so the last step keeps a small rate);
    constant: warmup only.
    """
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "rsqrt":
        return warm * math.sqrt(max(warmup_steps, 1) / max(step, warmup_steps, 1))
    if schedule == "cosine":
        progress = max(0.0, (step - warmup_steps) / max(1, total_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm


class LitClassifier(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-9,
        schedule: str = "rsqrt",
        warmup_steps: int = 1000,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={schedule!r} is not one of {SCHEDULES}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.metrics = nn.ModuleDict(
            {split: MulticlassAccuracy(num_classes, average="micro") for split in ("train_acc", "val_acc", "test_acc")}
        )

    def forward(self, batch):
        return self.model(batch)

    def _step(self, batch, split: str):
        logits = self.model(batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        metric = self.metrics[f"{split}_acc"]
        metric(logits.detach(), batch["label"])
        bs = batch["label"].shape[0]
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=on_step, batch_size=bs)
        self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.schedule, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
