"""Models and data modules on one process."""

import pytest
import torch

from lightning_distnn.data import CIFAR10DataModule, DigitsDataModule, SyntheticDataModule
from lightning_distnn.models import CaseStudyCNN, ImageClassifier, SeedNet, count_parameters


def test_case_study_defaults_are_the_seed():
    net = CaseStudyCNN()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 5 and all(c.out_channels == 512 for c in convs)
    assert len(fcs) == 3 and [f.out_features for f in fcs] == [1024, 1024, 10]
    assert len(net) == 8  # one block per layer: what the model partitioners split


def test_case_study_forward_shapes():
    net = CaseStudyCNN(conv_filters=8, fc_width=16)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    net = CaseStudyCNN(conv_filters=4, fc_width=8, image_size=16, num_classes=3)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_case_study_bad_pooling():
    with pytest.raises(ValueError, match="pool_after"):
        CaseStudyCNN(pool_after=[0, 7])
    with pytest.raises(ValueError, match="image_size=8"):
        CaseStudyCNN(image_size=8)


def test_seed_net():
    net = SeedNet()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(net) == 62006  # the seed's LeNet


def test_classifier_contract():
    module = ImageClassifier(SeedNet())
    assert isinstance(module.net, torch.nn.Sequential)
    loss = module.loss_fn(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert loss.ndim == 0


def test_digits_split_and_shape():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == 359
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long
    assert -1.0 <= x.min() and x.max() <= 1.0
    dm2 = DigitsDataModule()
    dm2.setup()
    assert torch.equal(dm.test_set.tensors[1], dm2.test_set.tensors[1])  # fixed split


def test_synthetic_any_shape():
    dm = SyntheticDataModule(num_samples=10, image_shape=(1, 8, 8), num_classes=3, batch_size=5)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 8, 8) and int(y.max()) < 3


def test_cifar_missing_files_names_path(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)
    assert "download" in str(err.value)


def test_cifar_reads_torchvision_format(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 20))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
