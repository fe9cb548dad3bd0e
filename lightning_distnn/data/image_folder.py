"""Images read from files: ``<root>/<class name>/<image>.png`` (or jpg, jpeg, bmp).

Classes are the sub-folders in sorted order (label 0 = first). Each image is converted to
``channels`` (3: RGB, 1: grey), resized to ``image_size`` and scaled to [-1, 1], like the
digits. Files are read when a sample is requested, so a data-parallel rank reads only the
files of its shard.

``export_image_folder(x, y, root)`` writes tensors as such a folder (tests, benchmarks, and to
turn any dataset into files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset

from lightning_distnn.data.base import ImageDataModule, split_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<class>/<file>``.

    Args:
        root: the folder holding one sub-folder per class.
        image_size: side of the square images returned (``None``: keep the files' size, which must agree).
        channels: 3 (RGB) or 1 (grey).
    """

    def __init__(self, root: str | Path, image_size: Optional[int] = 32, channels: int = 3) -> None:
        self.root = Path(root).expanduser()
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB).")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root.resolve()} does not exist: point data.root at a folder with one "
                "sub-folder of images per class (root/<class>/<image>.png)."
            )
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(
                f"image folder {self.root.resolve()} has no class sub-folders: put the images of each class in "
                "root/<class name>/."
            )
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(f, label) for f in files]
        if not self.samples:
            raise ValueError(
                f"image folder {self.root.resolve()} has class folders {self.classes[:5]} but no images with "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}."
            )
        self.targets = [label for _, label in self.samples]
        self.image_size = image_size
        self.channels = channels
        self._check_headers()

    def _check_headers(self) -> None:
        """Open every file's header and verify what the format lets PIL verify without decoding (PNG: every
        chunk and its CRC, so a truncated or half-copied file is caught): an undecodable file fails here,
        identically on every rank, instead of on the one rank whose shard holds it (its peers would see only
        a gloo error). Formats PIL cannot verify without decoding (JPEG) are checked by their header only."""
        from PIL import Image, UnidentifiedImageError

        bad = []
        for path, _ in self.samples:
            try:
                with Image.open(path) as img:
                    img.verify()
            except (OSError, UnidentifiedImageError, SyntaxError) as err:
                bad.append(f"{path} ({type(err).__name__}: {err})")
        if bad:
            raise ValueError(
                f"image folder {self.root.resolve()}: {len(bad)} of {len(self.samples)} files cannot be decoded, first: "
                f"{bad[0]}. Remove or replace them (or convert them to PNG)."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if self.channels == 3 else "L")
                if self.image_size is not None and img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
                w, h = img.size
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}. Remove or replace the file.") from err
        x = data.view(h, w, self.channels).permute(2, 0, 1).float() / 255.0
        return (x - 0.5) / 0.5

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.load(path), label


def export_image_folder(
    x: torch.Tensor, y: torch.Tensor, root: str | Path, class_names: Optional[Sequence[str]] = None
) -> Path:
    """Write images ``x`` (N, C, H, W) in [-1, 1] with labels ``y`` as PNG files under ``root/<class>/``."""
    from PIL import Image

    root = Path(root)
    names = list(class_names) if class_names is not None else [str(c) for c in range(int(y.max()) + 1)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    pixels = ((x.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8)
    for i, (img, label) in enumerate(zip(pixels, y.tolist())):
        arr = img.permute(1, 2, 0).contiguous().numpy()
        mode = "RGB" if arr.shape[2] == 3 else "L"
        Image.fromarray(arr if mode == "RGB" else arr[:, :, 0], mode=mode).save(root / names[label] / f"{i:06d}.png")
    return root


class ImageFolderDataModule(ImageDataModule):
    """An image folder with a fixed seeded split into train / validation / test.

    Args:
        root: folder with one sub-folder per class.
        image_size: side of the square images.
        channels: 3 or 1.
        val_fraction, test_fraction, split_seed: the split.
        **kwargs: batch_size, num_workers, partition, ... (see :class:`ImageDataModule`).
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.image_shape = (channels, image_size, image_size)
        self.fractions = (val_fraction, test_fraction)
        self.split_seed = split_seed

    def check(self) -> None:
        """The folder exists and holds class sub-folders with images."""
        ImageFolderDataset(self.root, self.image_size, self.channels)

    def build_datasets(self):
        full = ImageFolderDataset(self.root, self.image_size, self.channels)
        self.num_classes = len(full.classes)
        train, val, test = split_indices(len(full), self.fractions, self.split_seed)
        return Subset(full, train), Subset(full, val), Subset(full, test)
