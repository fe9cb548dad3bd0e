"""Data paths beside test_sqlite.py: one-channel and unreadable images and empty class folders in an
image folder; the SQLite converter's synthetic source and --overwrite."""

import numpy as np
import pytest
from PIL import Image

from lightning_distnn.data import ImageFolderDataset, SQLiteDataset
from lightning_distnn.data.sqlite import main as sqlite_main


def _folder(root, classes=("a", "b"), per_class=3, mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (8, 8) if mode == "L" else (8, 8, 3)
            Image.fromarray((rng.random(shape) * 255).astype("uint8"), mode=mode).save(root / c / f"{i}.png")
    return root


def test_one_channel_images_load_as_three_and_keep_their_values(tmp_path):
    root = _folder(tmp_path / "gray")
    ds = ImageFolderDataset(root, image_size=8)
    assert len(ds) == 6 and sorted(ds.targets) == [0, 0, 0, 1, 1, 1]
    img, _ = ds[0]
    assert img.shape == (3, 8, 8)
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()  # grey replicated, not garbage channels
    assert img.std() > 0


def test_unreadable_image_names_the_file(tmp_path):
    root = _folder(tmp_path / "bad")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    # every file's header is read when the dataset is built: the bad file fails there, the same on every rank
    with pytest.raises(ValueError, match=r"1 of 7 files cannot be decoded.*broken.png.*Remove or replace"):
        ImageFolderDataset(root, image_size=8)


def test_empty_class_folder_keeps_the_other_labels(tmp_path):
    root = _folder(tmp_path / "empty")
    (root / "c").mkdir()
    ds = ImageFolderDataset(root, image_size=8)
    assert len(ds) == 6
    labels = {path.parent.name: label for path, label in ds.samples}
    assert labels == {"a": 0, "b": 1}  # an empty folder never shifts the classes that have images


def test_converter_synthetic_source_and_overwrite(tmp_path):
    out = tmp_path / "s.sqlite"
    args = ["convert", "--source", "synthetic", "--num-samples", "40", "--image-size", "8", "--out", str(out)]
    assert sqlite_main(args) == 0
    train = SQLiteDataset(out, "train")
    assert len(train) == 40 and train.shape == (3, 8, 8)
    with pytest.raises(FileExistsError, match="overwrite"):
        sqlite_main(args[:4] + ["24"] + args[5:])
    assert len(SQLiteDataset(out, "train")) == 40  # untouched
    assert sqlite_main(args[:4] + ["24"] + args[5:] + ["--overwrite"]) == 0
    assert len(SQLiteDataset(out, "train")) == 24
