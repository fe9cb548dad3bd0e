"""Local SGD: its exact cases match one process; averaging happens on schedule; bad config.
(Convergence on digits against all-reduce: tests/test_compression.py::test_approximate_methods_converge_on_digits.)"""

from functools import partial

import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.parallel.local_sgd import LocalSGDConfig
from lightning_distnn.strategies import DataParallelStrategy, LocalSGDStrategy
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
PLAIN_SGD = partial(torch.optim.SGD, lr=0.1)


def _module(plain: bool):
    module = tiny_classifier(seed=0, conv_filters=4)
    if plain:
        module.optimizer_factory = PLAIN_SGD
    return module


CASES = {
    # plain SGD averaged after every step = synchronous SGD
    "period1_plain_sgd": (True, {"local_sgd_period": 1}),
    # warm-up covering every step = all-reduce (momentum SGD)
    "warmup_all_steps": (False, {"local_sgd_period": 3, "local_sgd_warmup_steps": STEPS}),
    # the approximate case: local steps, averaged at steps 3 and 6
    "period3": (True, {"local_sgd_period": 3}),
}


def _train(rank, world_size):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    out = {}
    for name, (plain, kwargs) in CASES.items():
        module = _module(plain)
        strategy = DataParallelStrategy(sync="local_sgd", timeout=60, **kwargs)
        quiet_trainer(strategy, devices=world_size, max_steps=STEPS).fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // world_size))
        out[name] = (cpu_state_dict(module.net), strategy._averager.averages)
    return out


def test_local_sgd_exact_cases_match_single_process_and_average_on_schedule():
    results = run_distributed(_train, 2, timeout=240)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    for name, (plain, _) in CASES.items():
        if name == "period3":
            continue
        expected = reference_train(_module(plain), x, y, GLOBAL_BATCH, STEPS)
        for res in results:
            assert_state_dicts_close(res[name][0], expected, atol=1e-5)
    assert [res["period1_plain_sgd"][1] for res in results] == [STEPS, STEPS]
    assert [res["warmup_all_steps"][1] for res in results] == [0, 0]
    assert [res["period3"][1] for res in results] == [2, 2]
    # the approximate case against local SGD written out in plain torch: each replica steps on its own
    # shard, parameters averaged after steps 3 and 6 (synchronous SGD would differ from it)
    expected = _local_sgd_reference(x, y, period=3, world_size=2)
    for res in results:
        assert_state_dicts_close(res["period3"][0], expected, atol=1e-5)
    synchronous = reference_train(_module(True), x, y, GLOBAL_BATCH, STEPS)
    assert max((expected[k] - synchronous[k]).abs().max().item() for k in expected) > 1e-3


def _local_sgd_reference(x, y, *, period, world_size):
    """``world_size`` copies of the plain-SGD module, each on its DistributedSampler shard, averaged every ``period``."""
    import copy

    from lightning_distnn.testing.equivalence import sampler_order

    order = sampler_order(len(x))
    local_batch = GLOBAL_BATCH // world_size
    replicas = [copy.deepcopy(_module(True)) for _ in range(world_size)]
    optimizers = [PLAIN_SGD(r.parameters()) for r in replicas]
    for step in range(STEPS):
        for rank, (replica, optimizer) in enumerate(zip(replicas, optimizers)):
            mine = order[rank::world_size][step * local_batch : (step + 1) * local_batch]
            optimizer.zero_grad()
            replica.loss_fn(replica(x[mine]), y[mine]).backward()
            optimizer.step()
        if (step + 1) % period == 0:
            with torch.no_grad():
                for params in zip(*(r.parameters() for r in replicas)):
                    mean = torch.stack([p for p in params]).mean(0)
                    for p in params:
                        p.copy_(mean)
    return {k: v.detach().clone() for k, v in replicas[0].net.state_dict().items()}


def test_bad_local_sgd_config_and_registered_name():
    with pytest.raises(ValueError, match="local_sgd_period=0"):
        DataParallelStrategy(sync="local_sgd", local_sgd_period=0)
    with pytest.raises(ValueError, match="local_sgd_warmup_steps"):
        LocalSGDConfig(period=2, warmup_steps=-1)
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="distnn_local_sgd", logger=False)
    assert isinstance(trainer.strategy, LocalSGDStrategy) and trainer.strategy.sync == "local_sgd"
