"""Data-parallel and parameter-server paths beside the main equivalence tests: DCP resume of
DataParallelStrategy, server optimizers with several parameter groups, the fp16 and top-k codecs in
a real parameter-server run, dedicated servers in async mode."""


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
    reference_epochs,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 4, 16


def _two_groups(params):
    """SGD with two parameter groups of different learning rates and momenta (module-level: picklable)."""
    params = list(params)
    return torch.optim.SGD([{"params": params[:2], "lr": 0.2}, {"params": params[2:], "momentum": 0.5}], lr=0.05, momentum=0.9)


PS_RUNS = {
    "two_groups": {"num_servers": 2},
    "topk_all": {"compression": "topk", "topk_ratio": 1.0},
    "fp16": {"compression": "fp16"},
}


def _module(name):
    module = tiny_classifier(seed=0, conv_filters=4)
    if name == "two_groups":
        module.optimizer_factory = _two_groups
    return module


def _paths(rank, world_size, ckpt):
    out = {}
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    for name, kwargs in PS_RUNS.items():
        module = _module(name)
        strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **kwargs)
        quiet_trainer(strategy, devices=world_size, max_steps=STEPS).fit(
            module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // world_size))
        out[name] = cpu_state_dict(module.net)

    # DataParallelStrategy writes a DCP directory and resumes from it (other initial weights: all from the file)
    data = FixedDataModule(*digits_tensors(32), 16 // world_size)
    module = tiny_classifier(seed=0)
    trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(ckpt)
    module = tiny_classifier(seed=123)
    trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_epochs=2, max_steps=-1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    out["resumed"] = (trainer.global_step, cpu_state_dict(module.net))
    return out


def test_dp_resume_and_parameter_server_paths(tmp_path):
    import os

    ckpt = str(tmp_path / "dp")
    results = run_distributed(_paths, 2, ckpt, timeout=400)
    assert os.path.isdir(ckpt)  # a DCP directory, not a single file
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    initial = _module("fp16").net.state_dict()
    expected = {name: reference_train(_module(name), x, y, GLOBAL_BATCH, STEPS) for name in PS_RUNS}
    # the two groups really differ from one group, so the servers must have rebuilt both
    plain = reference_train(tiny_classifier(seed=0, conv_filters=4), x, y, GLOBAL_BATCH, STEPS)
    assert max((expected["two_groups"][k] - plain[k]).abs().max().item() for k in plain) > 1e-3
    for name in PS_RUNS:
        assert_state_dicts_close(results[1][name], results[0][name], atol=0.0)  # the workers agree exactly
    two_epochs = reference_epochs(tiny_classifier(seed=0), *digits_tensors(32), 16, 2)
    for r in results:
        assert_state_dicts_close(r["two_groups"], expected["two_groups"], atol=1e-5)
        assert_state_dicts_close(r["topk_all"], expected["topk_all"], atol=1e-5)
        movement = {k: (expected["fp16"][k] - initial[k]).abs().max().item() for k in initial}
        relative = max((r["fp16"][k] - expected["fp16"][k]).abs().max().item() / movement[k] for k in initial)
        assert 0 < relative < 0.05, relative  # fp16 pushes, fp32 average and step on the server
        assert r["resumed"][0] == 4
        assert_state_dicts_close(r["resumed"][1], two_epochs, atol=1e-5)


def _dedicated_async(rank, world_size, steps):
    x, y = digits_tensors(steps * 16)
    module = tiny_classifier(seed=0, conv_filters=4)
    initial = cpu_state_dict(module.net)
    strategy = DataParallelStrategy(sync="parameter_server", ps_mode="async", max_staleness=1, num_servers=1,
                                    colocated=False, timeout=60)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=steps)
    trainer.fit(module, datamodule=FixedDataModule(x, y, 8))
    state = cpu_state_dict(module.net)
    moved = max((state[k] - initial[k]).abs().max().item() for k in state)
    return trainer.global_step, moved, strategy.comm_bytes_per_step()


@pytest.mark.slow
def test_dedicated_servers_in_async_mode():
    steps = 6
    results = run_distributed(_dedicated_async, 3, steps, timeout=300)
    numel = sum(p.numel() for p in tiny_classifier(seed=0, conv_filters=4).parameters())
    for global_step, moved, traffic in results[:2]:  # the workers trained and pulled fp32 parameters each step
        assert global_step == steps and moved > 1e-3
        assert traffic["received"] == pytest.approx(4 * numel)
    # the dedicated server (rank 2) received every push of both workers and answered each. Its rank takes no
    # optimizer step, so its counter may report totals (steps=0) rather than per-step values: compare totals
    server = results[2][2]
    steps_counted = max(server["steps"], 1)
    assert server["received"] * steps_counted == pytest.approx(steps * 2 * (16 + 4 * numel) + 2 * 16)
    assert server["sent"] * steps_counted == pytest.approx(steps * 2 * 4 * numel)
