"""The balanced partition finds its example input in every way Lightning accepts data (issue 19),
without consuming anything the training iterates; the model-parallel contract is checked before
the first step."""

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_distnn  # noqa: F401
from lightning_distnn.models import ImageClassifier
from lightning_distnn.strategies import HybridStrategy, PipelineStrategy
from lightning_distnn.strategies._common import check_forward_is_network
from lightning_distnn.strategies._example import ENTRY_POINTS, peek_inputs
from lightning_distnn.testing import run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer, tiny_classifier


# ---- one process: peeking consumes nothing ------------------------------------------------------
def test_peek_map_style_loader_collates_without_iterating():
    x = torch.arange(40.0).view(10, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4, shuffle=True)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    got = peek_inputs(loader)
    assert torch.equal(got, x[:4])  # the first samples, collated by the loader's own collate_fn
    assert torch.equal(torch.get_rng_state(), before[0])  # the sampler's seed draw did not happen
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


def test_peek_skips_one_shot_iterators_and_reads_iterables():
    batches = [(torch.ones(2, 3), torch.zeros(2)), (torch.zeros(2, 3), torch.zeros(2))]
    it = iter(batches)
    assert peek_inputs(it) is None  # peeking would eat a batch
    assert next(it)[0].sum() == 6  # nothing was consumed
    assert torch.equal(peek_inputs(batches), torch.ones(2, 3))  # a re-iterable list of batches
    assert peek_inputs([DataLoader(TensorDataset(torch.ones(3, 2)), batch_size=2)]).shape == (2, 2)  # list of loaders
    assert peek_inputs(DataLoader(TensorDataset(torch.ones(0, 2)), batch_size=2)) is None  # empty


class _Head(pl.LightningModule):
    def __init__(self, preprocess=False, twice=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.preprocess, self.twice = preprocess, twice

    def forward(self, x):
        if self.preprocess:
            x = x * 2
        out = self.net(x)
        return self.net(out) if self.twice else self.head(out)


class _Plain(_Head):
    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    "module,what",
    [(_Head(), "changes the output"), (_Head(preprocess=True), "changes the input"), (_Head(twice=True), "2 times")],
)
def test_forward_that_does_more_than_the_network_is_refused(module, what):
    with pytest.raises(ValueError, match=f"forward .*{what}.*append the head"):
        check_forward_is_network(module, "net", torch.ones(2, 4))


def test_forward_that_is_the_network_passes():
    module = _Plain()
    check_forward_is_network(module, "net", torch.ones(2, 4))
    assert isinstance(module.net, nn.Sequential)  # restored


# ---- 2 processes: every entry point of fit/validate/test/predict ------------------------------
def _entry_points(rank, world_size, strategy_kwargs):
    x, y = digits_tensors(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    out = {}

    def strategy():
        return HybridStrategy(timeout=60, **strategy_kwargs)  # partition="balanced": the default

    def trainer():
        return quiet_trainer(strategy(), devices=world_size, max_steps=2, limit_val_batches=1)

    trainer().fit(tiny_classifier(), train_dataloaders=loader)
    out["fit(train_dataloaders=)"] = True
    trainer().fit(tiny_classifier(), loader, val_dataloaders=loader)
    out["fit(loader, val_dataloaders=)"] = True
    trainer().fit(tiny_classifier(), datamodule=FixedDataModule(x, y, 8))
    out["fit(datamodule=)"] = True
    trainer().fit(tiny_classifier(), FixedDataModule(x, y, 8))  # a datamodule passed positionally
    out["fit(datamodule positional)"] = True
    for fn in ("validate", "test"):
        getattr(trainer(), fn)(tiny_classifier(), dataloaders=loader, verbose=False)
        out[f"{fn}(dataloaders=)"] = True
        getattr(trainer(), fn)(tiny_classifier(), datamodule=FixedDataModule(x, y, 8), verbose=False)
        out[f"{fn}(datamodule=)"] = True
    predictions = trainer().predict(tiny_classifier(), dataloaders=DataLoader(x, batch_size=8))
    out["predict(dataloaders=)"] = sum(int(p.shape[0]) for p in predictions)
    try:
        trainer().predict(tiny_classifier(), dataloaders=DataLoader(x[:0], batch_size=8))
        out["empty"] = "no error"
    except ValueError as error:
        out["empty"] = str(error)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(dp=1, pp=2), dict(dp=1, pp=2, schedule="gpipe", microbatches=2)], ids=["1f1b", "gpipe"])
def test_balanced_partition_finds_an_example_at_every_entry_point(kwargs):
    out = run_distributed(_entry_points, 2, kwargs, timeout=400)[0]
    assert out.pop("predict(dataloaders=)") == 32  # every sample predicted once
    assert "example" in out.pop("empty") and ENTRY_POINTS.split(",")[0] in str(ENTRY_POINTS)
    assert all(v is True for v in out.values()), out


def _pipeline_preset_with_loader(rank, world_size):
    x, y = digits_tensors(32)
    trainer = quiet_trainer(PipelineStrategy(timeout=60), devices=world_size, max_steps=2)
    trainer.fit(tiny_classifier(), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    return trainer.global_step


@pytest.mark.slow
def test_pipeline_default_with_train_dataloaders():
    # the exact call: Trainer(devices=2, strategy="distnn_pipeline"-like default) + fit(model, train_dataloaders=)
    assert run_distributed(_pipeline_preset_with_loader, 2, timeout=300) == [2, 2]


def _head_outside(rank, world_size):
    x, y = digits_tensors(16)
    module = tiny_classifier()
    module.forward = lambda inputs: module.net(inputs).softmax(-1)  # a head applied outside the network
    trainer = quiet_trainer(PipelineStrategy(timeout=60), devices=world_size, max_steps=1)
    try:
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    except ValueError as error:
        return str(error)
    return "trained"


@pytest.mark.slow
def test_head_outside_the_network_refused_before_the_first_step():
    messages = run_distributed(_head_outside, 2, timeout=300)
    assert all("changes the output of self.net" in m for m in messages), messages
