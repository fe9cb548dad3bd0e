"""DataParallelStrategy: equivalence with one process, sample coverage, registration."""

import lightning.pytorch as pl
import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import DataParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    cpu_state_dict,
    digits_tensors,
    quiet_trainer,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 6, 16


def _train_dp(rank, world_size, steps, global_batch):
    module = tiny_classifier(seed=0)
    x, y = digits_tensors(steps * global_batch)
    trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_steps=steps)
    trainer.fit(module, datamodule=FixedDataModule(x, y, global_batch // world_size))
    assert trainer.strategy.parallel_dims.dp == world_size
    return cpu_state_dict(module.net)


@pytest.mark.parametrize("world_size", [2])
def test_dp_matches_single_process(world_size):
    results = run_distributed(_train_dp, world_size, STEPS, GLOBAL_BATCH, timeout=240)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    expected = reference_train(tiny_classifier(seed=0), x, y, GLOBAL_BATCH, STEPS)
    initial = tiny_classifier(seed=0).net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"
    for rank_state in results:
        assert_state_dicts_close(rank_state, expected, atol=1e-5)


def test_registered_names():
    names = pl.strategies.StrategyRegistry.available_strategies()
    assert "distnn_dp" in names
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="distnn_dp", logger=False)
    assert isinstance(trainer.strategy, DataParallelStrategy)


def test_unknown_sync_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="allreduce"):
        DataParallelStrategy(sync="gossip")
