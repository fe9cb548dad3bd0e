"""Parameter server: sync equivalence (sharded, co-located and dedicated), async convergence,
dead ranks, bad input."""

import os
import time
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
    reference_epochs,
    reference_train,
    sampler_order,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 6, 16


def _scheduled(module):
    """A step-interval LR schedule (lr x0.2 every 2 steps): the servers must follow it, not the initial lr."""
    def configure_optimizers():
        optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    return module


def _train_ps(rank, world_size, workers, steps, global_batch, strategy_kwargs):
    module = _scheduled(tiny_classifier(seed=0, conv_filters=4))
    x, y = digits_tensors(steps * global_batch)
    strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **strategy_kwargs)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=steps)
    trainer.fit(module, datamodule=FixedDataModule(x, y, global_batch // workers))
    return {"state": cpu_state_dict(module.net), "worker": strategy._ps.is_worker, "bytes": strategy.comm_bytes_per_step()}


def _reference(steps=STEPS, global_batch=GLOBAL_BATCH):
    """One process, the same schedule stepped after every optimizer step."""
    x, y = digits_tensors(steps * global_batch)
    unscheduled = reference_train(tiny_classifier(seed=0, conv_filters=4), x, y, global_batch, steps)
    x, y = x[sampler_order(len(x))], y[sampler_order(len(x))]  # the order a distributed Trainer sees
    ref = _scheduled(tiny_classifier(seed=0, conv_filters=4))
    config = ref.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for step in range(steps):
        sl = slice(step * global_batch, (step + 1) * global_batch)
        optimizer.zero_grad()
        ref.loss_fn(ref(x[sl]), y[sl]).backward()
        optimizer.step()
        scheduler.step()
    expected = {k: v.detach().clone() for k, v in ref.net.state_dict().items()}
    initial = tiny_classifier(seed=0, conv_filters=4).net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"
    assert any((expected[k] - unscheduled[k]).abs().max() > 1e-3 for k in expected), "the schedule changed nothing"
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
    return accs


@pytest.mark.slow
def test_async_ps_converges_on_digits():
    runs = {
        "sync": {"sync": "parameter_server"},
        "async": {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2},
    }
    accs = run_distributed(_convergence, 2, runs, 10, timeout=400)[0]
    # run-to-run noise of the final accuracy is ~3 points: judge each run on its own, far from chance (0.1);
    # that async really ran asynchronously is test_async_workers_run_ahead_within_the_bound
    assert accs["sync"] > 0.8, accs
    assert accs["async"] > 0.7, accs


class _StepClock(pl.Callback):
    """Records when each training step ends; rank ``slow_rank`` sleeps before each step."""

    def __init__(self, slow_rank, delay):
        self.slow_rank, self.delay, self.ends = slow_rank, delay, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.slow_rank:
            time.sleep(self.delay)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.monotonic())  # CLOCK_MONOTONIC: one clock for every process of this machine


def _clocked(rank, world_size, runs, steps):
    x, y = digits_tensors(steps * 16)
    out = {}
    for name, kwargs in runs.items():
        clock = _StepClock(slow_rank=1, delay=0.3)
        module = tiny_classifier(seed=0, conv_filters=4)
        strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **kwargs)
        trainer = quiet_trainer(strategy, devices=world_size, max_steps=steps, callbacks=[clock])
        trainer.fit(module, datamodule=FixedDataModule(x, y, 8))
        out[name] = clock.ends
    return out


def _max_lead(fast, slow):
    """Most steps the fast worker had finished beyond the slow one, at any of its step ends."""
    return max(sum(t <= end for t in fast) - sum(t <= end for t in slow) for end in fast)


def test_async_workers_run_ahead_within_the_bound():
    runs = {"sync": {}, "async": {"ps_mode": "async", "max_staleness": 2}}
    results = run_distributed(_clocked, 2, runs, 10, timeout=300)
    sync_lead = _max_lead(results[0]["sync"], results[1]["sync"])
    async_lead = _max_lead(results[0]["async"], results[1]["async"])
    assert sync_lead <= 1, sync_lead  # lock-step: a step ends only when every worker pushed
    # async: the fast worker does not wait for the slow one (a lock-step "async" stays at 1) ...
    assert async_lead >= 2, (sync_lead, async_lead)
    # ... but the server holds its reply once it is max_staleness=2 pushes ahead (+1: it may be replying)
    assert async_lead <= 3, (sync_lead, async_lead)


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


# ---- checkpoints: the servers' optimizer state and parameters survive a save/restore ----------
def _ps_steps(model, ps, rank, steps, first):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        ps.push_pull()


def _ps_resume(rank, world_size):
    import copy

    from lightning_distnn.parallel.param_server import ParameterServerGroup

    def build(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    def sgd(params):
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)

    out = {}
    # 4 uninterrupted steps, 2 co-located servers (each holds part of the model)
    model = build(0)
    plan = plan_shards(model.named_parameters(), servers=[0, 1], workers=[0, 1])
    ps = ParameterServerGroup(model, plan, optimizer_factory=sgd, timeout=60)
    _ps_steps(model, ps, rank, 4, 0)
    ps.close()
    out["continuous"] = copy.deepcopy(model.state_dict())

    # 2 steps, "save" (module weights + the workers' optimizer after export_state), "restore" elsewhere, 2 steps
    model = build(0)
    optimizer = sgd(list(model.parameters()))
    ps = ParameterServerGroup(model, plan, optimizer_factory=sgd, timeout=60)
    _ps_steps(model, ps, rank, 2, 0)
    ps.export_state(optimizer)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    ps.close()
    out["exported_buffers"] = sum(1 for st in optimizer.state.values() if "momentum_buffer" in st)

    model = build(123)  # other initial weights: everything must come from the "checkpoint"
    optimizer = sgd(list(model.parameters()))
    ps = ParameterServerGroup(model, plan, optimizer_factory=sgd, timeout=60)
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    ps.import_state(optimizer)  # without it the servers serve the weights they copied at construction
    _ps_steps(model, ps, rank, 2, 2)
    ps.close()
    out["resumed"] = copy.deepcopy(model.state_dict())
    return out


def test_server_state_survives_export_and_import():
    results = run_distributed(_ps_resume, 2, init_process_group=True, timeout=180)
    for r in results:
        assert r["exported_buffers"] == 4  # every tensor's momentum, from both servers, on every rank
        assert_state_dicts_close(r["resumed"], r["continuous"], atol=1e-6)
    assert_state_dicts_close(results[1]["resumed"], results[0]["resumed"], atol=0.0)


EPOCH_SAMPLES = 32  # 2 steps of 16 per epoch


def _ps_fit(rank, world_size, path, resume, kwargs):
    module = tiny_classifier(seed=123 if resume else 0, conv_filters=4)
    x, y = digits_tensors(EPOCH_SAMPLES)
    strategy = DataParallelStrategy(sync="parameter_server", timeout=60, **kwargs)
    trainer = quiet_trainer(strategy, devices=world_size, max_epochs=2 if resume else 1, max_steps=-1)
    workers = world_size - (0 if kwargs.get("colocated", True) else kwargs.get("num_servers", 1))
    trainer.fit(module, datamodule=FixedDataModule(x, y, 16 // workers), ckpt_path=path if resume else None)
    if not resume:
        trainer.save_checkpoint(path)
    return trainer.global_step, cpu_state_dict(module.net)


@pytest.mark.slow
def test_ps_checkpoint_resumes_weights_and_momentum(tmp_path):
    path = str(tmp_path / "ps")
    kwargs = {"num_servers": 2}
    run_distributed(_ps_fit, 2, path, False, kwargs, timeout=240)
    results = run_distributed(_ps_fit, 2, path, True, kwargs, timeout=240)
    expected = reference_epochs(tiny_classifier(seed=0, conv_filters=4), *digits_tensors(32), 16, 2)
    for global_step, state in results:
        assert global_step == 4
        assert_state_dicts_close(state, expected, atol=1e-5)
