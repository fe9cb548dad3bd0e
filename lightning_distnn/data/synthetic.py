"""Random images of any shape and class count, for throughput measurements."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_distnn.data.base import ImageDataModule


class SyntheticDataModule(ImageDataModule):
    """Seeded random images ``(num_samples, *image_shape)`` with random labels.

    The labels carry no signal: use it to measure speed, not accuracy.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        eval_samples: int = 256,
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.eval_samples = eval_samples
        self.data_seed = data_seed

    def _make(self, n: int, offset: int) -> TensorDataset:
        g = torch.Generator().manual_seed(self.data_seed + offset)
        x = torch.randn(n, *self.image_shape, generator=g)
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        return TensorDataset(x, y)

    def build_datasets(self):
        return self._make(self.num_samples, 0), self._make(self.eval_samples, 1), self._make(self.eval_samples, 2)
