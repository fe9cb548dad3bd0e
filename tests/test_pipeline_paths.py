"""PipelineStrategy paths beside the schedule equivalence test: evaluation with looped and V schedules,
gradient accumulation, clipping with 2 stages per rank, the Gantt chart, and the error branches."""

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import PipelineStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    digits_tensors,
    quiet_trainer,
    reference_train,
    sampler_order,
    tiny_classifier,
)

MICRO = 4


def _local(module):
    return {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()}


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


class _DictBatches(pl.LightningDataModule):
    def train_dataloader(self):
        x, y = digits_tensors(16)
        return DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=16)


def _paths(rank, world_size, gantt):
    x, y = digits_tensors(48)
    out = {}
    # evaluation on a looped and a V schedule (2 stages per rank); 10 samples do not split into 4 (padded)
    evaluation = FixedDataModule(x[32:42], y[32:42], 10)
    for schedule in ("interleaved_1f1b", "zbv_zero_bubble"):
        module = tiny_classifier(seed=0)
        trainer = quiet_trainer(PipelineStrategy(schedule=schedule, microbatches=MICRO, partition="uniform", timeout=60),
                                world_size, 1, limit_val_batches=1.0)
        out[schedule] = {
            "val": trainer.validate(module, datamodule=evaluation, verbose=False)[0]["val/loss"],
            "test": trainer.test(module, datamodule=evaluation, verbose=False)[0]["test/loss"],
            "predict": torch.cat(trainer.predict(module, datamodule=evaluation)),
        }

    # gradient accumulation: 2 batches of 8 per optimizer step, 2 steps; a Gantt chart at the end of fit
    module = tiny_classifier(seed=0)
    strategy = PipelineStrategy(schedule="1f1b", microbatches=MICRO, partition="uniform", gantt_path=gantt, timeout=60)
    trainer = quiet_trainer(strategy, world_size, 2, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=FixedDataModule(x[:32], y[:32], 8))
    out["accumulated"] = _local(module)

    # clipping by the whole model's norm with 2 stages per rank
    module = tiny_classifier(seed=0)
    trainer = quiet_trainer(PipelineStrategy(schedule="interleaved_1f1b", microbatches=MICRO, partition="uniform",
                                             timeout=60), world_size, 2, gradient_clip_val=0.05)
    trainer.fit(module, datamodule=FixedDataModule(x[:32], y[:32], 16))
    out["clipped"] = _local(module)

    # error branches: balanced partition with no example input anywhere (an empty loader: a loader with data
    # is an example since issue 19, tests/test_example_inputs.py); batches that are not (inputs, targets)
    loader = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=16)
    out["no_example"] = _error(lambda: quiet_trainer(
        PipelineStrategy(partition="balanced", timeout=60), world_size, 1).fit(tiny_classifier(seed=0), train_dataloaders=loader))
    out["dict_batch"] = _error(lambda: quiet_trainer(
        PipelineStrategy(partition="uniform", timeout=60), world_size, 1).fit(tiny_classifier(seed=0), datamodule=_DictBatches()))
    return out


def _reference_clipped(x, y, steps, clip):
    order = sampler_order(len(x))
    x, y = x[order], y[order]
    ref = copy.deepcopy(tiny_classifier(seed=0))
    opt = ref.configure_optimizers()
    for step in range(steps):
        opt.zero_grad()
        ref.loss_fn(ref(x[16 * step: 16 * (step + 1)]), y[16 * step: 16 * (step + 1)]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    return {k: v.detach() for k, v in ref.net.state_dict().items()}


def test_pipeline_paths(tmp_path):
    gantt = str(tmp_path / "gantt.png")
    per_rank = run_distributed(_paths, 2, gantt, timeout=500)
    x, y = digits_tensors(48)
    ref = tiny_classifier(seed=0)
    with torch.no_grad():
        logits = ref(x[32:42])
    loss = ref.loss_fn(logits, y[32:42]).item()
    for r in per_rank:
        for schedule in ("interleaved_1f1b", "zbv_zero_bubble"):
            assert r[schedule]["val"] == pytest.approx(loss, abs=1e-5), schedule
            assert r[schedule]["test"] == pytest.approx(loss, abs=1e-5), schedule
            assert torch.equal(r[schedule]["predict"], logits.argmax(dim=1)), schedule
        assert "partition='balanced'" in r["no_example"] and "example_input_array" in r["no_example"], r["no_example"]
        assert r["dict_batch"].startswith("TypeError") and "(inputs, targets)" in r["dict_batch"], r["dict_batch"]

    def merged(key):
        out = {}
        for r in per_rank:
            assert not set(out) & set(r[key])
            out.update(r[key])
        return out

    # accumulating 2 batches of 8 = one batch of 16 (Lightning scales each loss by 1/2)
    assert_state_dicts_close(merged("accumulated"), reference_train(tiny_classifier(seed=0), x[:32], y[:32], 16, 2), atol=1e-5)
    clipped = _reference_clipped(x[:32], y[:32], 2, 0.05)
    unclipped = reference_train(tiny_classifier(seed=0), x[:32], y[:32], 16, 2)
    assert max((clipped[k] - unclipped[k]).abs().max().item() for k in clipped) > 1e-4  # the clip bites
    assert_state_dicts_close(merged("clipped"), clipped, atol=1e-5)
    with open(gantt, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(gantt) > 1000


class _Manual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))

    def loss_fn(self, outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets)


def test_manual_optimisation_is_refused_before_any_step():
    strategy = PipelineStrategy(partition="uniform")
    pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    with pytest.raises(ValueError, match="manual optimisation.*automatic_optimization=True"):
        strategy.connect(_Manual())
