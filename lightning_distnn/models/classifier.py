"""The LightningModule used by every recipe: a network, a loss, accuracy metrics."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn


class ImageClassifier(pl.LightningModule):
    """Image classification around any ``nn.Sequential`` network.

    It satisfies the model-parallel contract of lightning_distnn: the network is the
    ``nn.Sequential`` attribute ``net`` and ``loss_fn(outputs, targets)`` is the loss, so the
    pipeline and tensor-parallel strategies can split it without changes.

    Args:
        net: the network, e.g. :class:`~lightning_distnn.models.CaseStudyCNN`.
        optimizer: a partial that takes the parameters (Hydra: ``_partial_: true``); built in
            ``configure_optimizers``, i.e. after the strategy has distributed the model.
            Default: SGD, lr 0.01, momentum 0.9.
        scheduler: optional partial that takes the optimizer.
        num_classes: classes for the accuracy metrics.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer or partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(outputs, targets)

    def _shared_step(self, batch, stage: str, metric: torchmetrics.Metric) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        metric(logits.detach(), y)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
