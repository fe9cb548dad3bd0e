"""The pipeline timeline: what each rank did in every schedule step, and where the time went.

A :class:`TaskRecord` is one span of a rank's step: compute (``F`` forward, ``B`` full backward,
``I`` input gradient, ``W`` weight gradient) or communication (``R`` blocked receiving from the
``peer`` stage, ``S`` sending to it). :meth:`Timeline.breakdown` splits one rank's step into
compute, receive waits (per source stage), sending, the rest of the schedule's own time
(``other``: Python bookkeeping, loss, chunking) and the time between steps spent outside the
schedule (``outside``: optimizer, Lightning's loop, the output broadcast). With the records of
every rank of one host, :func:`split_waits` tells apart a receive wait spent waiting for the
producing stage to finish its task (the structural bubble) from the one spent on the transfer
itself.

Times are ``time.perf_counter()`` seconds (one clock per host: ranks of one machine can be drawn
on a shared axis, :mod:`lightning_distnn.pipeline_viz`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from torch.distributed.pipelining import PipelineStage

from lightning_distnn._compat import time_stage_p2p, wrap_stage_tasks

COMPUTE = ("F", "B", "I", "W")
COMM = ("R", "S")


@dataclass
class TaskRecord:
    """One span of a step: compute F/B/I/W, or R (blocked receiving from ``peer``) / S (sending to ``peer``)."""

    step: int
    rank: int
    stage: int
    microbatch: int
    kind: str
    start: float
    end: float
    peer: int = -1

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class StepBreakdown:
    """Where one rank's step went, in seconds (``span`` = compute + recv_wait + send + other)."""

    rank: int
    step: int
    span: float
    compute: float
    recv_wait: float
    send: float
    other: float
    outside: float
    recv_from: dict[int, float] = field(default_factory=dict)

    def fractions(self) -> dict[str, float]:
        """Each part as a fraction of the step's span (``outside`` too, though it lies beyond the span)."""
        if not self.span > 0:
            return {k: math.nan for k in ("compute", "recv_wait", "send", "other", "outside")}
        return {k: getattr(self, k) / self.span for k in ("compute", "recv_wait", "send", "other", "outside")}


@dataclass
class Timeline:
    """Records of the last ``keep_steps`` schedule steps of this rank, with each step's wall span."""

    rank: int = 0
    keep_steps: int = 4
    records: list[TaskRecord] = field(default_factory=list)
    spans: dict[int, tuple[float, float]] = field(default_factory=dict)
    step: int = -1

    def begin_step(self) -> None:
        self.step += 1
        self.spans[self.step] = (time.perf_counter(), math.nan)
        oldest = self.step - self.keep_steps
        self.records = [r for r in self.records if r.step > oldest]
        self.spans = {k: v for k, v in self.spans.items() if k >= oldest}  # one more span: the gap before

    def end_step(self) -> None:
        start, _ = self.spans[self.step]
        self.spans[self.step] = (start, time.perf_counter())

    def add(self, stage: int, microbatch: int, kind: str, start: float, end: float) -> None:
        """Record a compute task (the callback of :func:`lightning_distnn._compat.wrap_stage_tasks`)."""
        if self.step >= 0:
            self.records.append(TaskRecord(self.step, self.rank, stage, microbatch, kind, start, end))

    def add_comm(self, stage: int, peer: int, microbatch: int, kind: str, start: float, end: float) -> None:
        """Record a receive wait or a send (the callback of :func:`lightning_distnn._compat.time_stage_p2p`)."""
        if self.step >= 0:
            self.records.append(TaskRecord(self.step, self.rank, stage, microbatch, kind, start, end, peer))

    def of_step(self, step: Optional[int] = None) -> list[TaskRecord]:
        step = self.step if step is None else step
        return [r for r in self.records if r.step == step]

    def finished_steps(self) -> list[int]:
        return sorted(s for s, (_, e) in self.spans.items() if not math.isnan(e) and s > self.step - self.keep_steps)

    def bubble(self, step: Optional[int] = None) -> float:
        """Measured idle fraction of this rank in one step: 1 - compute time / (step wall time)."""
        b = self.breakdown(step)
        return math.nan if b is None or not b.span > 0 else max(0.0, 1.0 - b.compute / b.span)

    def breakdown(self, step: Optional[int] = None) -> Optional[StepBreakdown]:
        """Where this rank's time went in one step (default: the last); ``None`` for an unfinished step."""
        step = self.step if step is None else step
        if step not in self.spans or math.isnan(self.spans[step][1]):
            return None
        start, end = self.spans[step]
        parts: dict[str, float] = defaultdict(float)
        recv_from: dict[int, float] = defaultdict(float)
        for r in self.of_step(step):
            parts[r.kind] += r.duration
            if r.kind == "R":
                recv_from[r.peer] += r.duration
        compute = sum(parts[k] for k in COMPUTE)
        previous = self.spans.get(step - 1)
        outside = start - previous[1] if previous is not None and not math.isnan(previous[1]) else math.nan
        return StepBreakdown(
            rank=self.rank,
            step=step,
            span=end - start,
            compute=compute,
            recv_wait=parts["R"],
            send=parts["S"],
            other=max(0.0, end - start - compute - parts["R"] - parts["S"]),
            outside=outside,
            recv_from=dict(recv_from),
        )

    def mean_breakdown(self, steps: list[int]) -> dict[str, float]:
        """Mean seconds per step of each part of :meth:`breakdown` over ``steps`` (``recv_from_<stage>`` too)."""
        parts = [b for b in (self.breakdown(s) for s in steps) if b is not None]
        if not parts:
            return {k: math.nan for k in ("span", "compute", "recv_wait", "send", "other", "outside")}
        out = {k: sum(getattr(b, k) for b in parts) / len(parts) for k in ("span", "compute", "recv_wait", "send", "other")}
        outside = [b.outside for b in parts if not math.isnan(b.outside)]
        out["outside"] = sum(outside) / len(outside) if outside else math.nan
        for stage in sorted({p for b in parts for p in b.recv_from}):
            out[f"recv_from_{stage}"] = sum(b.recv_from.get(stage, 0.0) for b in parts) / len(parts)
        return out


def split_waits(records: list[TaskRecord], step: Optional[int] = None) -> dict[int, dict[str, float]]:
    """Per rank, its receive waits of one step split into ``dependency`` and ``transfer`` seconds.

    A wait for micro-batch ``i`` from stage ``p`` lasts from its start until the data arrived; the
    part before the producing task (F of ``(p, i)``, or its B/I for a gradient) ended on the other
    rank is the structural bubble (``dependency``), the rest is the transfer. Needs the records of
    every rank of one host (a shared clock), e.g. ``PipelineStrategy.gather_timeline()``.
    """
    if not records:
        return {}
    step = max(r.step for r in records) if step is None else step
    chosen = [r for r in records if r.step == step]
    produced: dict[tuple[str, int, int], float] = {}
    for r in chosen:
        if r.kind in COMPUTE:
            key = ("F" if r.kind == "F" else "B", r.stage, r.microbatch)
            produced[key] = max(produced.get(key, -math.inf), r.end)
    out: dict[int, dict[str, float]] = defaultdict(lambda: {"dependency": 0.0, "transfer": 0.0})
    for r in chosen:
        if r.kind != "R":
            continue
        direction = "F" if r.peer < r.stage else "B"
        ready = produced.get((direction, r.peer, r.microbatch))
        waited = 0.0 if ready is None else min(max(0.0, ready - r.start), r.duration)
        out[r.rank]["dependency"] += waited
        out[r.rank]["transfer"] += r.duration - waited
    return dict(out)


def replay(
    queues: dict[int, list[Any]],
    *,
    duration: Callable[[Any], float],
    needs: Callable[[Any], Optional[Hashable]],
    made: Callable[[Any], Hashable],
    deliver: Optional[Callable[[Any, float], float]] = None,
) -> Optional[tuple[dict[int, float], dict[int, float]]]:
    """Run every rank's tasks in their order on an idealised machine; ``(end, busy)`` seconds per rank.

    ``queues``: rank -> its tasks in the order it runs them. A task starts once its rank is free and
    what it ``needs`` (the key another task ``made``; ``None``: nothing) is there, and runs for its
    ``duration``. A product used on the rank that made it is there when its task ends; on another
    rank when ``deliver(task, end)`` says (default: at once, free communication). A key no task
    makes is taken as given. ``None`` when the tasks cannot all run (one waits for a task behind it).
    """
    produced = {made(t): rank for rank, q in queues.items() for t in q}
    done: dict[Hashable, float] = {}
    arrived: dict[Hashable, float] = {}
    clock = {rank: 0.0 for rank in queues}
    busy = {rank: 0.0 for rank in queues}
    position = {rank: 0 for rank in queues}
    progress = True
    while progress:
        progress = False
        for rank, queue in queues.items():
            while position[rank] < len(queue):
                task = queue[position[rank]]
                dep = needs(task)
                ready = 0.0
                if dep is not None and dep in produced:
                    there = done if produced[dep] == rank else arrived
                    if dep not in there:
                        break
                    ready = there[dep]
                took = duration(task)
                clock[rank] = max(clock[rank], ready) + took
                busy[rank] += took
                key = made(task)
                done[key] = max(done.get(key, 0.0), clock[rank])
                arrived[key] = max(arrived.get(key, 0.0), deliver(task, clock[rank]) if deliver else clock[rank])
                position[rank] += 1
                progress = True
    if any(position[rank] < len(queue) for rank, queue in queues.items()):
        return None
    return clock, busy


def structural_bubble(records: list[TaskRecord], step: Optional[int] = None,
                      transfer: Optional[Callable[[int, int], float]] = None) -> dict[int, float]:
    """Per rank, the bubble its schedule would have with these compute times and free communication.

    Replays one step (default: the last) from the records of every rank with :func:`replay`: each
    rank runs its compute tasks (F/B/I/W) in the order it ran them and for as long as they took,
    each task starting once its rank is free and its input exists (F of the stage before for a
    forward; B or I of the stage after for a backward; I of the same stage for W), with no time for
    transfers and none for the runtime's own work. The bubble of a rank is then
    ``1 - compute / span`` as in :meth:`Timeline.bubble`, its span running from the step's start to
    its last task's end. This is the schedule's structural bubble for the stage costs the run really
    had (unequal stages included), where
    :func:`~lightning_distnn.parallel.pipeline.schedules.theoretical_bubble` assumes equal ones; the
    measured bubble above it is what communication and the runtime cost. NaN for every rank when the
    tasks cannot be replayed (a task waits for one that never runs).

    ``transfer(from_stage, to_stage)``: seconds one message takes between two stages on different
    ranks (latency + bytes / bandwidth, e.g. from ``measure_link``), sent in the background, one at a
    time per direction of a rank pair. With it the replay is the schedule's bubble with this run's
    compute *and* that link, so the measured bubble above it is the runtime's own cost alone.
    """
    if not records:
        return {}
    step = max(r.step for r in records) if step is None else step
    queues: dict[int, list[TaskRecord]] = defaultdict(list)
    for r in sorted((r for r in records if r.step == step and r.kind in COMPUTE), key=lambda r: r.start):
        queues[r.rank].append(r)
    last_stage = max((r.stage for q in queues.values() for r in q), default=0)
    deliver = None
    if transfer is not None:
        send = over_links({r.stage: rank for rank, q in queues.items() for r in q}, transfer)
        deliver = lambda r, end: send(r.kind, r.stage, end)  # noqa: E731
    result = replay(queues, duration=lambda r: r.duration, needs=lambda r: task_needs(r.kind, r.stage, r.microbatch, last_stage),
                    made=lambda r: task_makes(r.kind, r.stage, r.microbatch), deliver=deliver)
    if result is None:
        return {rank: math.nan for rank in queues}
    clock, busy = result
    return {rank: max(0.0, 1.0 - busy[rank] / clock[rank]) if clock[rank] > 0 else math.nan for rank in queues}


def over_links(where: dict[int, int], occupy: Callable[[int, int], float],
               latency: Optional[Callable[[int, int], float]] = None) -> Callable[[str, int, float], float]:
    """``send(kind, stage, end)``: when what a task of ``stage`` made at ``end`` reaches the stage that needs it.

    ``where``: stage -> rank. A forward's activation goes to the next stage, a backward's (or input
    gradient's) to the one before; on the same rank it is there at once. Between two ranks it is
    sent in the background over their link, which carries one message at a time per direction for
    ``occupy(from_stage, to_stage)`` seconds, and lands ``latency(from_stage, to_stage)`` later.
    """
    busy_until: dict[tuple[int, int], float] = {}

    def send(kind: str, stage: int, end: float) -> float:
        to = stage + 1 if kind == "F" else stage - 1 if kind in ("B", "I") else -1
        if to not in where or where[to] == where[stage]:
            return end
        pair = (where[stage], where[to])
        busy_until[pair] = max(end, busy_until.get(pair, 0.0)) + occupy(stage, to)
        return busy_until[pair] + (latency(stage, to) if latency else 0.0)

    return send


def task_makes(kind: str, stage: int, microbatch: int) -> tuple[str, int, int]:
    """What a pipeline task produces: an activation (``F``), an input gradient (``B`` or ``I``), weight grads."""
    return ("F" if kind == "F" else "B" if kind in ("B", "I") else "W", stage, microbatch)


def task_needs(kind: str, stage: int, microbatch: int, last_stage: int) -> Optional[tuple[str, int, int]]:
    """What a pipeline task waits for: the forward of the stage before; the backward of the stage after (the
    last stage: its own forward); W its own I."""
    if kind == "F":
        return ("F", stage - 1, microbatch) if stage > 0 else None
    if kind in ("B", "I"):
        return ("B", stage + 1, microbatch) if stage < last_stage else ("F", stage, microbatch)
    return ("B", stage, microbatch)


def record_tasks(stage: PipelineStage, timeline: Timeline) -> None:
    """Time every F/B/I/W task ``stage`` runs, and its receive waits and sends, into ``timeline``."""
    wrap_stage_tasks(stage, timeline.add)
    time_stage_p2p(stage, timeline.add_comm)
