"""Reference pieces for equivalence tests: a tiny model, fixed data, single-process training.

A distributed layout is *equivalent* when, from the same seed and the same global batches, it
ends with the same weights as :func:`reference_train` on one process (fp32, ``atol=1e-5``).
Lightning gives every distributed training loader a ``DistributedSampler(shuffle=True, seed=0)``:
epoch ``e`` draws ``perm = randperm(n)`` from a generator seeded ``seed + e`` and rank ``r`` takes
``perm[r::dp]``. The k-th global batch of ``dp`` ranks with local batch ``b`` is therefore the set
``perm[k*b*dp : (k+1)*b*dp]``: the reference steps through ``x[perm]`` in contiguous global
batches (:func:`sampler_order`).
"""

from __future__ import annotations

import copy
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_distnn.data.digits import load_digits_tensors
from lightning_distnn.models import CaseStudyCNN, ImageClassifier


def tiny_classifier(seed: int = 0, conv_filters: int = 8, fc_width: int = 16, image_size: int = 16, **cnn) -> ImageClassifier:
    """A case-study CNN at toy width on ``image_size`` digits, seeded."""
    torch.manual_seed(seed)
    net = CaseStudyCNN(conv_filters=conv_filters, fc_width=fc_width, image_size=image_size, **cnn)
    return ImageClassifier(net)


def digits_tensors(n: int = 256, image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors(image_size)
    return x[:n].clone(), y[:n].clone()


class FixedDataModule(pl.LightningDataModule):
    """Serves fixed tensors; ``batch_size`` is per data-parallel rank (the Trainer's sampler orders them)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.dataset = TensorDataset(x, y)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    val_dataloader = test_dataloader = predict_dataloader = train_dataloader


def sampler_order(n: int, epoch: int = 0, seed: int = 0) -> torch.Tensor:
    """The permutation Lightning's DistributedSampler draws for ``epoch`` (``n`` divisible by dp)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def reference_train(
    module: ImageClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    global_batch: int,
    steps: int,
    order: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Train a deep copy of ``module`` on one process; returns its network's state dict.

    ``order`` permutes the samples first (default: :func:`sampler_order` of epoch 0, which is
    what a distributed Trainer sees); the run must stay within one epoch.
    """
    if steps * global_batch > len(x):
        raise ValueError(f"{steps} steps of {global_batch} need {steps * global_batch} samples, got {len(x)}.")
    order = sampler_order(len(x)) if order is None else order
    x, y = x[order], y[order]
    ref = copy.deepcopy(module)
    optimizer = ref.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    for step in range(steps):
        sl = slice(step * global_batch, (step + 1) * global_batch)
        optimizer.zero_grad()
        loss = ref.loss_fn(ref(x[sl]), y[sl])
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in ref.net.state_dict().items()}


def reference_epochs(module: ImageClassifier, x: torch.Tensor, y: torch.Tensor, global_batch: int,
                     epochs: int) -> dict[str, torch.Tensor]:
    """Train a deep copy of ``module`` on one process for whole ``epochs``, each in the order the
    distributed sampler draws for that epoch (the reference of a run that checkpoints and resumes)."""
    ref = copy.deepcopy(module)
    optimizer = ref.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    for epoch in range(epochs):
        order = sampler_order(len(x), epoch=epoch)
        xe, ye = x[order], y[order]
        for step in range(len(x) // global_batch):
            sl = slice(step * global_batch, (step + 1) * global_batch)
            optimizer.zero_grad()
            ref.loss_fn(ref(xe[sl]), ye[sl]).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in ref.net.state_dict().items()}


def quiet_trainer(strategy, devices: int, max_steps: int, **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or validation."""
    options = dict(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
