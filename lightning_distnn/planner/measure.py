"""Measure layouts for real: train each for a few steps with ``lightning.Trainer`` and its registered strategy.

:func:`measure_layouts` spawns ``world_size`` gloo processes (:func:`lightning_distnn.testing.run_distributed`);
in them each layout is trained, one after the other, with the strategy the planner would use
(:func:`~lightning_distnn.planner.search.strategy_for`), on random data of the planned global batch.
The step time is the median interval between consecutive ``on_train_batch_end`` calls after
``warmup`` steps (rank 0's clock), so the optimizer step and every collective are inside it.
``rounds > 1`` interleaves the layouts (A B C A B C ...) so drift of a shared machine hits all alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_distnn.planner.cost import Layout
from lightning_distnn.planner.search import strategy_for


class StepTimer(pl.Callback):
    """Wall-clock time of every training step (end to end of consecutive batches)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _measure_rank(rank: int, world_size: int, factory: Callable[..., nn.Sequential], factory_kwargs: dict,
                  sample_shape: Sequence[int], num_classes: int, global_batch: int, layouts: Sequence[Layout],
                  steps: int, warmup: int, rounds: int, timeout: float) -> dict[str, list[float]]:
    from lightning_distnn.models import ImageClassifier
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    out: dict[str, list[float]] = {layout.label: [] for layout in layouts}
    generator = torch.Generator().manual_seed(0)
    n = global_batch * (steps + warmup)
    x = torch.randn(n, *sample_shape, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    for _ in range(rounds):
        for layout in layouts:
            torch.manual_seed(0)
            module = ImageClassifier(factory(**factory_kwargs), num_classes=num_classes)
            strategy = strategy_for(layout).build(timeout=timeout)
            timer = StepTimer()
            trainer = quiet_trainer(strategy, devices=world_size, max_steps=steps + warmup, callbacks=[timer])
            trainer.fit(module, datamodule=FixedDataModule(x, y, global_batch // layout.dp))
            out[layout.label].extend(timer.intervals()[max(0, warmup - 1):])
    return out


def measure_layouts(
    layouts: Sequence[Layout],
    factory: Callable[..., nn.Sequential],
    factory_kwargs: dict,
    sample_shape: Sequence[int],
    *,
    global_batch: int,
    num_classes: int = 10,
    steps: int = 3,
    warmup: int = 1,
    rounds: int = 1,
    timeout: float = 1800.0,
    collective_timeout: float = 300.0,
) -> dict[str, dict[str, Any]]:
    """Train every layout for ``warmup + steps`` steps; returns label -> {"step_s": median, "samples": [...]}."""
    if not layouts:
        return {}
    worlds = {layout.world_size for layout in layouts}
    if len(worlds) != 1:
        raise ValueError(f"measure_layouts runs one world size at a time, got layouts of sizes {sorted(worlds)}.")
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps} and warmup={warmup} must be at least 1 (the first step includes set-up).")
    from lightning_distnn.testing import run_distributed

    results = run_distributed(_measure_rank, worlds.pop(), factory, factory_kwargs, tuple(sample_shape), num_classes,
                              global_batch, list(layouts), steps, warmup, rounds, collective_timeout, timeout=timeout)
    out = {}
    for label, samples in results[0].items():
        out[label] = {"step_s": statistics.median(samples) if samples else float("nan"), "samples": samples}
    return out
