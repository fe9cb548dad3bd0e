"""scikit-learn's handwritten digits, the embedded default dataset.

1,797 real 8x8 grey images of the digits 0-9 ship inside scikit-learn, so this dataset needs
no network. They are upsampled (bilinear) to ``image_size`` and repeated over 3 channels so
that CIFAR-10 models run on them unchanged; values are scaled to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_distnn.data.base import ImageDataModule, split_indices


def load_digits_tensors(image_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images ``(N, channels, image_size, image_size)`` and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


class DigitsDataModule(ImageDataModule):
    """Digits with a fixed split (seed 0): 70% train, 10% validation, 20% test.

    Args:
        image_size: side of the upsampled square images (default 32).
        val_fraction, test_fraction: the split; it depends only on ``split_seed``.
        **kwargs: batch_size, num_workers, ... (see :class:`ImageDataModule`).
    """

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)
        self.fractions = (val_fraction, test_fraction)
        self.split_seed = split_seed

    def build_datasets(self):
        x, y = load_digits_tensors(self.image_size)
        train, val, test = split_indices(len(y), self.fractions, self.split_seed)
        return tuple(TensorDataset(x[idx], y[idx]) for idx in (train, val, test))
