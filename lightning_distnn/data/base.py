"""Shared pieces of the data modules: splits, loaders, the batch-size contract.

``batch_size`` is the batch of one data-parallel rank (Lightning's convention); the global
batch is ``batch_size x dp``.

``partition`` picks how the training samples are spread over the data-parallel ranks
(:mod:`lightning_distnn.partition.data`: random, contiguous, stratified, kmeans, kmeans_local).
The default, ``random`` with ``seed=None``, draws exactly the order of the ``DistributedSampler``
Lightning would inject (seeded with ``seed_everything``'s seed).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """A fixed (seeded) split of ``range(n)`` into train/val/test; fractions are (val, test)."""
    val_fraction, test_fraction = fractions
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to less than 1."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def check_labels(labels, num_classes: int, where: str, *, fix: str = "") -> None:
    """Raise ValueError naming the first label outside ``0..num_classes-1``: its position, value, and the fix.

    Every rank runs it on the same data at setup, so every rank fails alike, before any collective.
    """
    labels = torch.as_tensor(labels)
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(
            f"label {int(labels[i])} at {where} row {i} is outside num_classes={num_classes} (labels must be 0.."
            f"{num_classes - 1}; {len(bad)} labels are outside). "
            + (fix or f"Fix the data, or use num_classes={int(labels.max()) + 1} for the model and the data.")
        )


class ImageDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`build_datasets` returning (train, val, test)."""

    num_classes: int = 10
    image_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: Optional[int] = None,
        partition: str = "random",
        partition_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (it is the batch of one rank).")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        from lightning_distnn.partition.data import PARTITIONERS

        if str(partition).lower() not in PARTITIONERS:
            raise ValueError(
                f"Unknown partition={partition!r}. Valid partitioners: {', '.join(PARTITIONERS)}. "
                "Set e.g. data.partition=stratified."
            )
        self.partition = str(partition).lower()
        self.partition_options = dict(partition_options or {})
        self.partition_report = None
        self.train_sampler = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``FileNotFoundError``/``ValueError`` naming the path and the fix when the data cannot be
        read. Cheap (no loading); ``distnn-train`` calls it in the launching process, before any rank
        starts. Data modules without files (digits, synthetic) have nothing to check."""

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_datasets()
        self._check_model_classes()

    def _check_model_classes(self) -> None:
        """A model with fewer outputs than the data has classes fails on the rank that meets such a label, as a
        raw index error (its peers as gloo errors); refuse it here, the same on every rank."""
        trainer = getattr(self, "_trainer", None) or getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        hparams = getattr(module, "hparams", None)
        model_classes = hparams.get("num_classes") if hparams is not None and hasattr(hparams, "get") else None
        if isinstance(model_classes, int) and model_classes < self.num_classes:
            raise ValueError(
                f"the data has num_classes={self.num_classes} (labels 0..{self.num_classes - 1}) but the model "
                f"{type(module).__name__} has num_classes={model_classes}: set model.num_classes={self.num_classes} "
                "(and the network's last layer to as many outputs)."
            )

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=self.shuffle and train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _sampler_kwargs(self) -> Optional[dict[str, Any]]:
        """``num_replicas``/``rank`` of the data-parallel group when a distributed trainer is attached."""
        trainer = getattr(self, "_trainer", None) or getattr(self, "trainer", None)
        if trainer is None or getattr(trainer, "world_size", 1) <= 1:
            return None
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
        if not kwargs:
            return None
        return {"num_replicas": int(kwargs.get("num_replicas", 1)), "rank": int(kwargs.get("rank", 0))}

    def build_train_sampler(self):
        """The partitioner of the training set (``None``: one process with ``partition="random"``)."""
        from lightning_distnn.partition.data import make_partitioner

        kwargs = self._sampler_kwargs()
        if kwargs is None and self.partition == "random":
            return None  # one process: a plain shuffled loader, as before
        kwargs = kwargs or {"num_replicas": 1, "rank": 0}
        seed = self.seed if self.seed is not None else int(os.getenv("PL_GLOBAL_SEED", 0))
        sampler = make_partitioner(
            self.partition,
            self.train_set,
            seed=seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            **kwargs,
            **self.partition_options,
        )
        # seed and clusters were broadcast; a rank whose dataset differs (order, size) would still disagree
        from lightning_distnn import sync

        sync.check_agreement(sampler.shards(0), f"the {self.partition} partition of the training set")
        return sampler

    def _log_partition_report(self, sampler) -> None:
        if self.partition_report is not None:
            return
        try:
            self.partition_report = sampler.report()
        except (ValueError, TypeError) as err:  # datasets without labels: sizes only
            log.debug("no partition report: %s", err)
            return
        rank_zero_info(f"[lightning_distnn] data partition at the start of fit:\n{self.partition_report}")

    def train_dataloader(self) -> DataLoader:
        sampler = self.build_train_sampler()
        self.train_sampler = sampler
        if sampler is None:
            return self._loader(self.train_set, train=True)
        self._log_partition_report(sampler)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

