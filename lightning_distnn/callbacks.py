"""Callbacks that measure a run: throughput and parameters per rank, gathered for the summary."""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_distnn.models.networks import count_parameters


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RunStats(pl.Callback):
    """Training images/s over all ranks (after ``warmup_steps``) and parameters held per rank.

    The global batch of a step is counted once per data-parallel replica: the strategy's
    ``distributed_sampler_kwargs['num_replicas']`` replicas each process ``batch_size`` samples.
    """

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.images = 0
        self.start: Optional[float] = None
        self.elapsed = 0.0
        self.stats: dict[str, Any] = {}

    @staticmethod
    def _replicas(trainer: pl.Trainer) -> int:
        kwargs = trainer.strategy.distributed_sampler_kwargs or {}
        return int(kwargs.get("num_replicas", 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup_steps and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.images += int(x.shape[0]) * self._replicas(trainer)
            self.elapsed = time.perf_counter() - self.start

    def on_train_end(self, trainer, pl_module) -> None:
        ips = self.images / self.elapsed if self.elapsed > 0 else float("nan")
        params = gather_object(count_parameters(pl_module))
        self.stats = {"images_per_s": ips, "params_per_rank": params, "world_size": trainer.world_size}
        # optional reports of the strategies: bytes per step, pipeline bubble
        for key, method in (("comm_bytes_per_step", "comm_bytes_per_step"), ("pipeline_bubble", "pipeline_bubble")):
            report = getattr(trainer.strategy, method, None)
            if callable(report):
                # the pipeline's structural bubble replays every rank's tasks: a collective, all ranks are here
                reports = gather_object(report(structural=True) if key == "pipeline_bubble" else report())
                if any(r is not None for r in reports):  # e.g. no pipeline bubble without a pipeline
                    self.stats[key] = reports
        if trainer.logger is not None:
            trainer.logger.log_metrics({"perf/images_per_s": ips}, step=trainer.global_step)


def format_number(v: Any) -> str:
    """One style for every number in a table: from 10,000 on, digits grouped (``1,003,008``, int or
    float alike); below, ints as they are and floats with 4 significant digits (``0.9778``, ``2055``)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if math.isfinite(v) and abs(v) >= 1e4:
        return f"{v:,.0f}"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def format_table(rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> str:
    """A GitHub-markdown table of ``rows`` (numbers as :func:`format_number` writes them)."""
    columns = columns or list(rows[0])
    fmt = format_number

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
