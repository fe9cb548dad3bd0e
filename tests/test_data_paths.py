"""Data paths beside test_sqlite.py: one-channel and unreadable images and empty class folders in an
image folder, alone and in a 2-process data-parallel run; the SQLite converter's synthetic and CIFAR-10
sources and --overwrite."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_distnn.data import ImageFolderDataset, SQLiteDataset
from lightning_distnn.data.sqlite import main as sqlite_main
from lightning_distnn.testing import run_distributed


def _folder(root, classes=("a", "b"), per_class=3, mode="L", side=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (side, side) if mode == "L" else (side, side, 3)
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
    (root / "a" / "broken.png").write_bytes((root / "a" / "0.png").read_bytes()[:60])  # header intact, data cut
    with pytest.raises(ValueError, match=r"1 of 7 files cannot be decoded.*broken.png.*Truncated"):
        ImageFolderDataset(root, image_size=8)


def test_empty_class_folder_keeps_the_other_labels(tmp_path):
    root = _folder(tmp_path / "empty")
    (root / "c").mkdir()
    ds = ImageFolderDataset(root, image_size=8)
    assert len(ds) == 6
    labels = {path.parent.name: label for path, label in ds.samples}
    assert labels == {"a": 0, "b": 1}  # an empty folder never shifts the classes that have images


def test_converter_synthetic_source_and_overwrite(tmp_path, capsys):
    out = tmp_path / "s.sqlite"
    args = ["convert", "--source", "synthetic", "--num-samples", "40", "--image-size", "8", "--out", str(out)]
    assert sqlite_main(args) == 0
    train = SQLiteDataset(out, "train")
    assert len(train) == 40 and train.shape == (3, 8, 8)
    assert sqlite_main(args[:4] + ["24"] + args[5:]) == 2  # refused, one line with the fix
    assert "--overwrite" in capsys.readouterr().err
    assert len(SQLiteDataset(out, "train")) == 40  # untouched
    assert sqlite_main(args[:4] + ["24"] + args[5:] + ["--overwrite"]) == 0
    assert len(SQLiteDataset(out, "train")) == 24


def _write_cifar(folder, per_batch=6):
    """Torchvision's CIFAR-10 python format: five training batches, a test batch, label names."""
    import pickle

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_converter_cifar10_source_keeps_pixels_and_labels(tmp_path, capsys):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "c.sqlite"
    argv = ["--source", "cifar10", "--data-dir", str(tmp_path), "--val-size", "5", "--out", str(out)]
    assert sqlite_main(argv) == 0
    sizes = {split: len(SQLiteDataset(out, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 25, "val": 5, "test": 6}  # 30 training images, 5 held out, and the test batch
    test = SQLiteDataset(out, "test")
    assert test.shape == (3, 32, 32) and sorted(int(test[i][1]) for i in range(6)) == list(range(6))
    from lightning_distnn.data.cifar10 import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=str(tmp_path), augment=False, val_size=5)
    dm.setup()
    x_ref, y_ref = dm.test_set[3]
    x, y = test[3]
    assert int(y) == int(y_ref) and torch.allclose(x.float(), x_ref.float(), atol=1e-2)  # the same image, not a re-draw
    assert sqlite_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the default val_size on a small copy says what to pass
    assert sqlite_main(argv[:4] + argv[6:] + ["--overwrite"]) == 2
    assert re.search(r"val_size=5000 must be in \[0, 30\).*--val-size", capsys.readouterr().err)


def _image_folder_run(rank, world_size, good, broken, steps):
    from lightning_distnn.data import ImageFolderDataModule
    from lightning_distnn.strategies import DataParallelStrategy
    from lightning_distnn.testing.equivalence import quiet_trainer, tiny_classifier

    dm = ImageFolderDataModule(root=good, image_size=16, batch_size=2, val_fraction=0.0, test_fraction=0.0)
    trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_steps=steps)
    model = tiny_classifier(image_size=16)
    trainer.fit(model, datamodule=dm)
    sampler = trainer.train_dataloader.sampler
    full = dm.train_set.dataset
    out = {
        "shard": sorted(int(dm.train_set.indices[i]) for i in sampler.shards(0)[rank]),
        "classes": list(full.classes),
        "labels": [label for _, label in full.samples],
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }
    try:  # the same run on a folder with an unreadable image: every rank fails alike, naming the file
        trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_steps=steps)
        trainer.fit(tiny_classifier(image_size=16),
                    datamodule=ImageFolderDataModule(root=broken, image_size=16, batch_size=2))
        out["error"] = None
    except ValueError as err:
        out["error"] = str(err)
    return out


@pytest.mark.slow
def test_image_folder_in_a_data_parallel_run(tmp_path):
    """One-channel images, an empty class folder and an unreadable file, under 2 data-parallel processes."""
    good = _folder(tmp_path / "good", classes=("a", "b", "d"), per_class=4, side=16)
    (good / "c_empty").mkdir()
    broken = _folder(tmp_path / "broken", classes=("a", "b"), per_class=2, side=16)
    (broken / "b" / "truncated.png").write_bytes((good / "a" / "0.png").read_bytes()[:40])
    results = run_distributed(_image_folder_run, 2, str(good), str(broken), 3, timeout=240)
    first, second = results
    assert first["classes"] == second["classes"] and first["labels"] == second["labels"]
    # the empty folder keeps its slot (labels stay stable when it fills later) and shifts no other class
    assert first["classes"] == ["a", "b", "c_empty", "d"] and sorted(set(first["labels"])) == [0, 1, 3]
    assert set(first["shard"]).isdisjoint(second["shard"]) and len(first["shard"]) + len(second["shard"]) == 12
    assert torch.equal(first["weights"], second["weights"])  # replicas agree after 3 steps
    for r in results:
        assert r["error"] and "truncated.png" in r["error"] and "cannot be decoded" in r["error"], r["error"]
    assert first["error"] == second["error"]
