"""Local SGD: replicas train on their own and average their parameters every ``period`` steps.

For the first ``warmup_steps`` optimizer steps gradients are all-reduced every step (plain data
parallel, through the DDP communication hook of :mod:`~lightning_distnn.parallel.compression`, so
a compressor applies there too); afterwards the hook stops communicating and
:class:`PeriodicAverager` averages the parameters (one fp32 all-reduce of all of them) after every
``period``-th step. ``period=1`` with no warm-up is synchronous SGD on parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from lightning_distnn.parallel.accounting import CommCounter
from lightning_distnn.parallel.collectives import flat_average_


@dataclass
class LocalSGDConfig:
    """``period``: steps between averages; ``warmup_steps``: steps of per-step all-reduce first."""

    period: int = 4
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"local_sgd_period={self.period!r} must be a positive integer (steps between averages).")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"local_sgd_warmup_steps={self.warmup_steps!r} must be an integer >= 0.")


class PeriodicAverager:
    """Averages parameters over ``group`` after every ``period``-th step past ``warmup_steps``."""

    def __init__(self, config: LocalSGDConfig, *, group: Optional[dist.ProcessGroup] = None, counter: Optional[CommCounter] = None) -> None:
        self.config = config
        self.group = group
        self.counter = counter or CommCounter()
        self.step = 0
        self.averages = 0

    @property
    def in_warmup(self) -> bool:
        """True while gradients are still all-reduced every step."""
        return self.step < self.config.warmup_steps

    def after_step(self, params: Iterable[torch.Tensor]) -> bool:
        """Call after each optimizer step; returns True when it averaged."""
        self.step += 1
        if self.step <= self.config.warmup_steps or (self.step - self.config.warmup_steps) % self.config.period:
            return False
        average_parameters(params, group=self.group, counter=self.counter)
        self.averages += 1
        return True


def average_parameters(params: Iterable[torch.Tensor], *, group: Optional[dist.ProcessGroup] = None, counter: Optional[CommCounter] = None) -> None:
    """Replace every tensor by its mean over ``group`` (one flat all-reduce per dtype)."""
    payload = flat_average_([p.detach() for p in params], group=group)
    if counter is not None and payload:
        counter.allreduce(payload, dist.get_world_size(group))
