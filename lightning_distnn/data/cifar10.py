"""CIFAR-10 from torchvision's on-disk format (``<data_dir>/cifar-10-batches-py``)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from lightning_distnn.data.base import ImageDataModule, check_labels, split_indices

CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def check_cifar10_files(data_dir: str | Path) -> None:
    """Raise ``FileNotFoundError`` naming the path and the fix when the batches are missing."""
    folder = Path(data_dir).expanduser().resolve() / "cifar-10-batches-py"
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {folder}: {', '.join(missing)}. Either pass data.download=true "
            f"(needs network access), or download cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {folder.parent}, "
            f"or point data.data_dir at the folder that holds cifar-10-batches-py."
        )


class CIFAR10Batches(Dataset):
    """CIFAR-10 read straight from torchvision's pickled batches (no checksum: tests write small ones)."""

    def __init__(self, data_dir: str | Path, train: bool, transform: Optional[Callable] = None) -> None:
        check_cifar10_files(data_dir)
        folder = Path(data_dir).expanduser().resolve() / "cifar-10-batches-py"
        names = CIFAR_FILES[:5] if train else CIFAR_FILES[5:]
        images, labels = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                batch_labels = [int(v) for v in entry.get("labels", entry.get("fine_labels", []))]
                if len(batch_labels) != len(images[-1]):
                    raise ValueError(f"{len(images[-1])} images but {len(batch_labels)} labels")
                check_labels(batch_labels, 10, f"{folder / name}",
                             fix="Delete the folder and download CIFAR-10 again (data.download=true).")
                labels.extend(batch_labels)
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as err:
                if str(err).startswith("label "):
                    raise
                raise ValueError(
                    f"{folder / name} is not a CIFAR-10 batch in torchvision's format ({err}): delete the folder "
                    "and download it again (data.download=true)."
                ) from err
        self.data = np.concatenate(images).transpose(0, 2, 3, 1)  # N, H, W, C like torchvision
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 45,000 train / 5,000 validation (fixed split from the train batches) / 10,000 test.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (torchvision's format).
        download: download the archive when it is missing (needs network access).
        augment: random crop and horizontal flip on the training split.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        augment: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download
        self.augment = augment
        self.val_size = val_size
        self.split_seed = split_seed

    def check(self) -> None:
        """The six batch files exist (unless ``download`` will fetch them)."""
        if not self.download:
            check_cifar10_files(self.data_dir)

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.data_dir, train=True, download=True)
            CIFAR10(self.data_dir, train=False, download=True)

    def build_datasets(self):
        from torchvision import transforms

        normalize = [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        train_tf = transforms.Compose(
            ([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else [])
            + normalize
        )
        eval_tf = transforms.Compose(normalize)
        train_full = CIFAR10Batches(self.data_dir, train=True, transform=train_tf)
        eval_full = copy.copy(train_full)  # same arrays, evaluation transform
        eval_full.transform = eval_tf
        n = len(train_full)
        if not 0 <= self.val_size < n:
            raise ValueError(
                f"val_size={self.val_size} must be in [0, {n}): {self.data_dir} holds {n} training images. Pass a smaller "
                f"val_size (data.val_size=... in distnn-train; distnn-to-sqlite --val-size)."
            )
        train_idx, val_idx, _ = split_indices(n, (self.val_size / n, 0.0), self.split_seed)
        test = CIFAR10Batches(self.data_dir, train=False, transform=eval_tf)
        return Subset(train_full, train_idx), Subset(eval_full, val_idx), test
