"""The pipeline timeline: every F/B/I/W task a rank ran, per schedule step, and the measured bubble.

Times are ``time.perf_counter()`` seconds (one clock per host: ranks of one machine can be drawn
on a shared axis, :mod:`lightning_distnn.pipeline_viz`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from torch.distributed.pipelining import PipelineStage

from lightning_distnn.parallel.pipeline._private import wrap_stage_tasks


@dataclass
class TaskRecord:
    """One task of the schedule as it ran: kind F (forward), B (full backward), I (input grad), W (weight grad)."""

    step: int
    rank: int
    stage: int
    microbatch: int
    kind: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Tasks of the last ``keep_steps`` schedule steps of this rank, with each step's wall span.

    Times are ``time.perf_counter()`` seconds (one clock per host: ranks of one machine can be
    drawn on a shared axis).
    """

    rank: int = 0
    keep_steps: int = 4
    records: list[TaskRecord] = field(default_factory=list)
    spans: dict[int, tuple[float, float]] = field(default_factory=dict)
    step: int = -1

    def begin_step(self) -> None:
        self.step += 1
        self.spans[self.step] = (time.perf_counter(), math.nan)
        oldest = self.step - self.keep_steps + 1
        self.records = [r for r in self.records if r.step >= oldest]
        self.spans = {k: v for k, v in self.spans.items() if k >= oldest}

    def end_step(self) -> None:
        start, _ = self.spans[self.step]
        self.spans[self.step] = (start, time.perf_counter())

    def add(self, stage: int, microbatch: int, kind: str, start: float, end: float) -> None:
        if self.step >= 0:
            self.records.append(TaskRecord(self.step, self.rank, stage, microbatch, kind, start, end))

    def of_step(self, step: Optional[int] = None) -> list[TaskRecord]:
        step = self.step if step is None else step
        return [r for r in self.records if r.step == step]

    def bubble(self, step: Optional[int] = None) -> float:
        """Measured idle fraction of this rank in one step: 1 - busy / (step wall time)."""
        step = self.step if step is None else step
        if step not in self.spans or math.isnan(self.spans[step][1]):
            return math.nan
        start, end = self.spans[step]
        busy = sum(r.duration for r in self.of_step(step))
        return max(0.0, 1.0 - busy / (end - start)) if end > start else math.nan


def record_tasks(stage: PipelineStage, timeline: Timeline) -> None:
    """Time every F/B/I/W task ``stage`` runs into ``timeline``."""
    wrap_stage_tasks(stage, timeline.add)
