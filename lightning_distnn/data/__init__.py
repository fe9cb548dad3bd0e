"""Data modules: digits (embedded default), CIFAR-10, synthetic, image folders, SQLite."""

from lightning_distnn.data.base import ImageDataModule, split_indices
from lightning_distnn.data.cifar10 import CIFAR10DataModule, check_cifar10_files
from lightning_distnn.data.digits import DigitsDataModule, load_digits_tensors
from lightning_distnn.data.synthetic import SyntheticDataModule
from lightning_distnn.data.image_folder import ImageFolderDataModule, ImageFolderDataset, export_image_folder
from lightning_distnn.data.sqlite import SQLiteDataModule, SQLiteDataset, write_sqlite

__all__ = [
    "ImageDataModule",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "SyntheticDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "export_image_folder",
    "SQLiteDataModule",
    "SQLiteDataset",
    "write_sqlite",
    "load_digits_tensors",
    "check_cifar10_files",
    "split_indices",
]
