"""Parameter server: sync equivalence (sharded, co-located and dedicated), async convergence,
dead ranks, bad input."""

import os
from functools import partial

import lightning.pytorch as pl
import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.parallel.param_server import plan_shards, split_roles
from lightning_distnn.strategies import DataParallelStrategy, ParameterServerStrategy
from lightning_distnn.testing import DistributedTestError, assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    cpu_state_dict,
    digits_tensors,
    quiet_trainer,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 6, 16


def _train_ps(rank, world_size, workers, steps, global_batch, strategy_kwargs):
    module = tiny_classifier(seed=0, conv_filters=4)
    x, y = digits_tensors(steps * global_batch)
    strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **strategy_kwargs)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=steps)
    trainer.fit(module, datamodule=FixedDataModule(x, y, global_batch // workers))
    return {"state": cpu_state_dict(module.net), "worker": strategy._ps.is_worker, "bytes": strategy.comm_bytes_per_step()}


def _reference(steps=STEPS, global_batch=GLOBAL_BATCH):
    x, y = digits_tensors(steps * global_batch)
    expected = reference_train(tiny_classifier(seed=0, conv_filters=4), x, y, global_batch, steps)
    initial = tiny_classifier(seed=0, conv_filters=4).net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"
    return expected


def test_sync_sharded_colocated_matches_single_process():
    results = run_distributed(_train_ps, 2, 2, STEPS, GLOBAL_BATCH, {"num_servers": 2}, timeout=240)
    expected = _reference()
    for r in results:
        assert r["worker"]
        assert_state_dicts_close(r["state"], expected, atol=1e-5)
        assert r["bytes"]["sent"] > 0 and r["bytes"]["steps"] == STEPS


@pytest.mark.slow
def test_sync_dedicated_server_matches_single_process():
    results = run_distributed(_train_ps, 3, 2, STEPS, GLOBAL_BATCH, {"num_servers": 1, "colocated": False}, timeout=300)
    expected = _reference()
    assert [r["worker"] for r in results] == [True, True, False]
    for r in results[:2]:
        assert_state_dicts_close(r["state"], expected, atol=1e-5)


def _convergence(rank, world_size, runs, epochs):
    from lightning_distnn.data import DigitsDataModule

    accs = {}
    for name, kwargs in runs.items():
        module = tiny_classifier(seed=0, conv_filters=16, fc_width=64)
        # Adam (the servers rebuild the user's optimizer class): SGD momentum 0.9 plus asynchrony's
        # implicit momentum overshoots, and plain SGD's last-epoch accuracy swings by several points
        module.optimizer_factory = partial(torch.optim.Adam, lr=3e-3)
        data = DigitsDataModule(image_size=16, batch_size=32)
        strategy = DataParallelStrategy(timeout=120, **kwargs)
        trainer = quiet_trainer(strategy, devices=world_size, max_epochs=epochs, max_steps=-1)
        trainer.fit(module, datamodule=data)
        accs[name] = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
        server = strategy._ps.server
        accs[name + "_max_lead"] = server.max_lead if server is not None else None
    return accs


@pytest.mark.slow
def test_async_ps_converges_close_to_sync_on_digits():
    runs = {
        "sync": {"sync": "parameter_server"},
        "async": {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2},
    }
    accs = run_distributed(_convergence, 2, runs, 10, timeout=400)[0]
    assert accs["sync"] > 0.8, accs
    assert accs["async"] >= accs["sync"] - 0.02, accs
    assert accs["async_max_lead"] <= 2, accs  # the staleness bound held


class _Die(pl.Callback):
    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(0)  # vanish without a word, like a killed process


def _train_and_die(rank, world_size, dying_rank, strategy_kwargs):
    module = tiny_classifier(seed=0, conv_filters=4)
    x, y = digits_tensors(128)
    strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **strategy_kwargs)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=6, callbacks=[_Die(dying_rank, 2)])
    trainer.fit(module, datamodule=FixedDataModule(x, y, 8))


@pytest.mark.parametrize("dying_rank, role", [(1, "worker"), (0, "server")])
def test_dead_rank_ends_job_with_its_rank(dying_rank, role):
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_train_and_die, 2, dying_rank, {"ps_mode": "async", "max_staleness": 1}, timeout=120)
    assert f"{role} rank {dying_rank}" in str(err.value)


def test_shard_plan_balances_and_prints():
    module = tiny_classifier(seed=0, conv_filters=4)
    plan = plan_shards(module.named_parameters(), servers=[0, 1], workers=[0, 1])
    total = sum(p.numel() for p in module.parameters())
    assert plan.values(0) + plan.values(1) == total
    assert abs(plan.values(0) - plan.values(1)) <= max(p.numel() for p in module.parameters())
    assert "| server rank |" in str(plan)


def test_bad_layouts_are_rejected_before_launch():
    with pytest.raises(ValueError, match="num_servers=3"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=DataParallelStrategy(sync="parameter_server", num_servers=3), logger=False)
    with pytest.raises(ValueError, match="no worker"):
        split_roles(2, 2, colocated=False)
    with pytest.raises(ValueError, match="ps_mode"):
        DataParallelStrategy(sync="parameter_server", ps_mode="eventual")
    with pytest.raises(ValueError, match="max_staleness"):
        DataParallelStrategy(sync="parameter_server", max_staleness=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="distnn_ps", logger=False)
    assert isinstance(trainer.strategy, ParameterServerStrategy) and trainer.strategy.sync == "parameter_server"
