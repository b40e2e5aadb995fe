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
    """Multiplier of the base learning rate at ``step`` (0-based).

    rsqrt: min(1, s/warmup) / sqrt(max(s, warmup)) -- LRA's text schedule exactly, so the peak
    rate is lr / sqrt(warmup) (LRA's lr 0.05 with warmup 1000 peaks at 1.6e-3);
    cosine: linear warmup, then cosine decay to zero at ``total_steps``; constant: warmup only.
    """
    s = step + 1
    warm = min(1.0, s / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "rsqrt":
        return warm / math.sqrt(max(s, warmup_steps, 1))
    if schedule == "cosine":
        if s <= warmup_steps:
            return warm
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
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
