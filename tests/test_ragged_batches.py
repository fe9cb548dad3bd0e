"""Pipeline and hybrid strategies take whatever batches Lightning gives them (issue 18): a last batch
that leaves a remainder of 1, or is smaller than the number of stages, trains exactly like one
process and evaluation counts every sample once."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import HybridStrategy, PipelineStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import digits_tensors, quiet_trainer, sampler_order, tiny_classifier

BATCH = 8
CASES = {
    # 17 = 2 x 8 + 1: the last batch has one sample (fewer than the 2 stages and the micro-batches);
    # microbatches="auto" (issue 15): measured at setup, the same count on both ranks, a divisor of 8
    "1f1b remainder 1, auto": (17, dict(dp=1, pp=2, schedule="1f1b", microbatches="auto", partition="uniform")),
    # 4 stages (interleaved, 2 per rank); 19 = 2 x 8 + 3: the last batch is smaller than the stages
    "interleaved last < stages": (19, dict(dp=1, pp=2, schedule="interleaved_1f1b", microbatches=4, partition="uniform")),
}


def _reference(n: int, epochs: int) -> dict:
    """One process, the same sampler order, batches of 8 with a short last one (mean loss per batch)."""
    x, y = digits_tensors(n)
    ref = copy.deepcopy(tiny_classifier(seed=0))
    optimizer = ref.configure_optimizers()
    for epoch in range(epochs):
        order = sampler_order(n, epoch=epoch)
        xs, ys = x[order], y[order]
        for start in range(0, n, BATCH):
            optimizer.zero_grad()
            ref.loss_fn(ref(xs[start : start + BATCH]), ys[start : start + BATCH]).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in ref.net.state_dict().items()}


def _full_state(strategy, module):
    local = {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()}
    parts = [None] * strategy.world_size
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _train(rank, world_size, case):
    n, kwargs = CASES[case]
    x, y = digits_tensors(n)
    module = tiny_classifier(seed=0)
    strategy = HybridStrategy(timeout=60, **kwargs)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=-1, max_epochs=2, limit_val_batches=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    state = _full_state(strategy, module)
    predictions = trainer.predict(module, dataloaders=DataLoader(x, batch_size=BATCH))
    result = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    # the same accuracy from the predictions, counting every sample once
    correct = sum(int((p == t).sum()) for p, t in zip(predictions, y.split(BATCH)))
    return {"state": state, "steps": trainer.global_step, "predicted": sum(len(p) for p in predictions),
            "val_acc": result["val/acc"], "acc": correct / n, "m": strategy.microbatches,
            "choice": strategy.auto_choice, "described": strategy.describe()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ragged_last_batch_matches_single_process(case):
    n, _ = CASES[case]
    results = run_distributed(_train, 2, case, timeout=400)
    expected = _reference(n, epochs=2)
    for r in results:
        assert r["steps"] == 2 * -(-n // BATCH)  # every batch trained, the short one too
        assert r["predicted"] == n  # no padded duplicates, nothing dropped
        assert abs(r["val_acc"] - r["acc"]) < 1e-6
        assert_state_dicts_close(r["state"], expected, atol=1e-5)
    if CASES[case][1]["microbatches"] == "auto":
        m = results[0]["m"]
        assert all(r["m"] == m for r in results) and BATCH % m == 0 and m >= 2, [r["m"] for r in results]
        choice = results[0]["choice"]
        assert choice["microbatches"] == m and choice["latency_s"] > 0 and choice["micro_compute_s"] > 0
        assert f"chose m={m} for a per-replica batch of {BATCH}" in choice["why"]
        assert f"m=auto->{m}" in results[0]["described"]


def _pipeline_preset(rank, world_size):
    # the command, as a Trainer: PipelineStrategy defaults (1f1b, m=4, balanced) on a ragged data set
    x, y = digits_tensors(21)
    trainer = quiet_trainer(PipelineStrategy(timeout=60), devices=world_size, max_steps=-1, max_epochs=2)
    trainer.fit(tiny_classifier(), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=BATCH))
    return trainer.global_step


@pytest.mark.slow
def test_pipeline_defaults_run_several_epochs_on_ragged_data():
    assert run_distributed(_pipeline_preset, 2, timeout=300) == [6, 6]
