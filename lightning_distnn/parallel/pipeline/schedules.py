"""Pipeline schedules as data: names, classes, stage placement, micro-batch rules, theoretical bubble.

Stage placement (:func:`stage_ranks`):

* single-stage schedules (``gpipe``, ``1f1b``): stage ``s`` on pp rank ``s``;
* looped schedules (``interleaved_1f1b``, ``looped_bfs``, ``interleaved_zero_bubble``) with
  ``v`` stages per rank: stage ``s`` on rank ``s % pp``;
* V schedules (``zbv_zero_bubble``, ``dualpipev``, exactly 2 stages per rank): rank ``r`` holds
  stages ``r`` and ``2*pp - 1 - r``, so the first and the last stage both live on rank 0.

Micro-batches: :func:`check_microbatches` validates the configured count before launch;
:func:`split_batch` decides how a batch of any size runs (the largest equal split the schedule
accepts, or its :data:`FALLBACK`); :func:`choose_microbatches` picks a count from measured compute
and message latency (:func:`modelled_step_seconds`).

Pure functions of names and numbers (no process group), so the launching process can validate a
layout before any process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SINGLE_STAGE = ("gpipe", "1f1b")
LOOPED = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")
V_SHAPED = ("zbv_zero_bubble", "dualpipev")


def schedule_name(name: str) -> str:
    """The canonical (lower-case) schedule name; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name.lower().replace("-", "_") not in SCHEDULES:
        raise ValueError(
            f"Unknown pipeline schedule {name!r}; valid schedules (case-insensitive): {', '.join(SCHEDULES)}."
        )
    return name.lower().replace("-", "_")


def schedule_class(name: str) -> type:
    """The ``torch.distributed.pipelining`` schedule class for a schedule name."""
    return SCHEDULES[schedule_name(name)]


def resolve_stages_per_rank(schedule: str, stages_per_rank: Optional[int]) -> int:
    """Stages each rank holds: 1 for gpipe/1f1b, 2 for V schedules, default 2 for looped ones."""
    schedule = schedule_name(schedule)
    if stages_per_rank is not None and (not isinstance(stages_per_rank, int) or stages_per_rank < 1):
        raise ValueError(f"stages_per_rank={stages_per_rank!r} must be a positive integer.")
    if schedule in SINGLE_STAGE:
        if stages_per_rank not in (None, 1):
            raise ValueError(
                f"schedule={schedule!r} runs one stage per rank, got stages_per_rank={stages_per_rank}: use "
                f"stages_per_rank=1, or a looped schedule ({', '.join(LOOPED)}) for several stages per rank."
            )
        return 1
    if schedule in V_SHAPED:
        if stages_per_rank not in (None, 2):
            raise ValueError(
                f"schedule={schedule!r} is V-shaped and needs exactly 2 stages per rank, got "
                f"stages_per_rank={stages_per_rank}: use stages_per_rank=2 (or leave it unset)."
            )
        return 2
    return 2 if stages_per_rank is None else stages_per_rank


def stage_ranks(schedule: str, num_stages: int, pp_size: int) -> list[int]:
    """The pp rank of every stage (see the module docstring)."""
    schedule = schedule_name(schedule)
    if schedule in V_SHAPED:
        return [s if s < pp_size else 2 * pp_size - 1 - s for s in range(num_stages)]
    return [s % pp_size for s in range(num_stages)]


def local_stage_indices(schedule: str, num_stages: int, pp_size: int, pp_rank: int) -> list[int]:
    """Stages this pp rank holds, in increasing order."""
    return [s for s, r in enumerate(stage_ranks(schedule, num_stages, pp_size)) if r == pp_rank]


def min_microbatches(schedule: str, pp_size: int, num_stages: int) -> int:
    """Fewest micro-batches a schedule accepts.

    1F1B needs one per stage in flight (``m >= pp``); DualPipeV needs ``m >= stages``; the
    others run with any ``m >= 1`` (torch pads the round-based schedules with idle slots).
    """
    schedule = schedule_name(schedule)
    if schedule == "1f1b":
        return pp_size
    if schedule == "dualpipev":
        return num_stages
    return 1


def count_problem(schedule: str, microbatches: int, *, pp_size: int, num_stages: int) -> Optional[str]:
    """Why ``schedule`` cannot run ``microbatches`` micro-batches (an instruction), or ``None`` when it can."""
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        return f"microbatches={microbatches!r} must be a positive integer."
    name = schedule_name(schedule)
    need = min_microbatches(name, pp_size, num_stages)
    if microbatches < need:
        return (
            f"schedule={name!r} with {num_stages} stages on {pp_size} pipeline ranks needs at least "
            f"{need} micro-batches, got microbatches={microbatches}: raise microbatches to {need} or more "
            "(and the batch size with it), or pick schedule='gpipe'."
        )
    if name in LOOPED + ("zbv_zero_bubble",):
        rounds = max(1, microbatches // pp_size)
        if microbatches % rounds:
            return (
                f"schedule={name!r} runs micro-batches in rounds of {pp_size} (the pp degree): "
                f"microbatches={microbatches} is not a multiple of its {rounds} rounds. Use a multiple of {pp_size} "
                f"(e.g. {rounds * pp_size}) or fewer than {pp_size}."
            )
    return None


def check_microbatches(
    batch_size: int,
    microbatches: int,
    *,
    schedule: str,
    pp_size: int,
    num_stages: int,
    where: str = "the training batch",
) -> None:
    """Raise ``ValueError`` (naming the fix) when a configured batch cannot run under the schedule.

    Layout validation before launch (the configured micro-batch count and batch size). At run
    time :class:`~lightning_distnn.parallel.pipeline.runtime.Pipeline` takes batches of any size
    (:func:`split_batch`).
    """
    problem = count_problem(schedule, microbatches, pp_size=pp_size, num_stages=num_stages)
    if problem:
        raise ValueError(problem)
    if batch_size % microbatches:
        lower = batch_size - batch_size % microbatches
        raise ValueError(
            f"{where} has {batch_size} samples, which do not split into microbatches={microbatches} equal "
            f"micro-batches (pipelining needs equal micro-batches): use a batch size that is a multiple of "
            f"{microbatches} (e.g. {lower or microbatches} or {lower + microbatches}), or set drop_last=True on the "
            "training DataLoader so the last short batch is dropped."
        )


# a schedule that runs the same stage placement with fewer micro-batches than the original accepts
FALLBACK = {"1f1b": "gpipe", "dualpipev": "zbv_zero_bubble"}


@dataclass(frozen=True)
class BatchSplit:
    """How one batch runs: the schedule, the micro-batch count and the size of each micro-batch."""

    schedule: str
    microbatches: int
    micro_size: int


def split_batch(batch_size: int, microbatches: int, *, schedule: str, pp_size: int, num_stages: int) -> BatchSplit:
    """The split of a batch of any size: equal micro-batches, as many as possible up to ``microbatches``.

    The largest count ``m <= microbatches`` that divides ``batch_size`` and that ``schedule``
    accepts; when there is none (e.g. 1F1B with fewer samples than stages), the same search on the
    schedule's fallback (:data:`FALLBACK`: GPipe for 1F1B, ZB-V for DualPipeV), which runs the same
    stage placement. A short last batch of 10 samples with ``microbatches=4`` runs as 2 x 5; a
    batch of 1 as 1 x 1.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"a pipeline batch needs at least one sample, got batch_size={batch_size!r}.")
    name = schedule_name(schedule)
    for candidate in (name, FALLBACK.get(name, name)):
        for m in range(min(microbatches, batch_size), 0, -1):
            if batch_size % m == 0 and count_problem(candidate, m, pp_size=pp_size, num_stages=num_stages) is None:
                return BatchSplit(candidate, m, batch_size // m)
    raise ValueError(  # not reached for the schedules we know: every fallback accepts one micro-batch
        f"schedule={name!r} cannot run a batch of {batch_size} samples on {pp_size} pipeline ranks: use schedule='gpipe'."
    )


def theoretical_bubble(schedule: str, pp_size: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a rank in the ideal schedule (equal stage costs, free communication).

    ``(p-1)/(m+p-1)`` for GPipe and 1F1B; ``(p-1)/(v*m+p-1)`` for the looped schedules
    (interleaved 1F1B, looped BFS) with ``v`` stages per rank (GPipe's with ``m < p``, when each
    round fills and drains alone); 0 for ZB-V (its claim when the
    forward, input-backward and weight-backward tasks cost the same). NaN where we use no closed
    form (interleaved zero bubble, DualPipeV): read the measured value.
    """
    p, m, v = pp_size, microbatches, stages_per_rank
    schedule = schedule_name(schedule)
    if p == 1:
        return 0.0
    if schedule in SINGLE_STAGE:
        return (p - 1) / (m + p - 1)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        # with fewer micro-batches than ranks every one of the v rounds fills and drains alone: GPipe's bubble
        return (p - 1) / (v * m + p - 1) if m >= p else (p - 1) / (m + p - 1)
    if schedule == "zbv_zero_bubble":
        return 0.0
    return math.nan


def modelled_step_seconds(
    microbatches: int,
    *,
    schedule: str,
    pp_size: int,
    stages_per_rank: int,
    compute_seconds: float,
    message_seconds: float,
    transfer_seconds: float = 0.0,
) -> float:
    """A rank's step time with ``microbatches`` micro-batches, in the ideal schedule's terms.

    Per micro-batch the busiest rank spends ``compute_seconds / m`` computing (``compute_seconds``:
    forward + backward of the whole batch on its stages), ``message_seconds`` on the fixed cost of
    its messages (latency x messages it exchanges per micro-batch) and ``transfer_seconds / m``
    moving bytes; the schedule's bubble (:func:`theoretical_bubble`; the looped form for the
    zero-bubble schedules, whose zero holds only in steady state) stretches the busy time.
    """
    m = microbatches
    name = schedule_name(schedule)
    busy = compute_seconds + transfer_seconds + m * message_seconds
    if name in SINGLE_STAGE:
        bubble = theoretical_bubble(name, pp_size, m)
    else:
        bubble = theoretical_bubble("interleaved_1f1b", pp_size, m, stages_per_rank)
    return busy / (1.0 - bubble)


def choose_microbatches(
    batch_size: int,
    *,
    schedule: str,
    pp_size: int,
    num_stages: int,
    compute_seconds: float,
    message_seconds: float,
    transfer_seconds: float = 0.0,
    max_microbatches: Optional[int] = None,
) -> int:
    """The micro-batch count for ``microbatches="auto"``: the fastest by :func:`modelled_step_seconds`.

    More micro-batches shrink the bubble, each one adds ``message_seconds`` of per-message latency:
    the best count balances the two. Candidates divide ``batch_size``, are accepted by the schedule
    and are at most ``max_microbatches`` (default: the batch size); ties go to the fewer. Measure
    ``compute_seconds`` with :func:`~lightning_distnn.partition.model.profile_layer_costs` (the
    slowest rank's layers, whole batch) and ``message_seconds`` as the p2p latency times the
    messages a rank exchanges per micro-batch (2 per remote cut of each of its stages: the
    activation and its gradient).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"choose_microbatches needs a positive batch_size, got {batch_size!r}.")
    if not compute_seconds > 0 or message_seconds < 0:
        raise ValueError(
            f"choose_microbatches needs compute_seconds > 0 and message_seconds >= 0, got {compute_seconds} and "
            f"{message_seconds}: pass measured times (seconds)."
        )
    per_rank = max(1, num_stages // pp_size)
    limit = batch_size if max_microbatches is None else min(batch_size, max_microbatches)
    best: Optional[tuple[float, int]] = None
    for m in range(1, limit + 1):
        if batch_size % m or count_problem(schedule, m, pp_size=pp_size, num_stages=num_stages) is not None:
            continue
        t = modelled_step_seconds(
            m,
            schedule=schedule,
            pp_size=pp_size,
            stages_per_rank=per_rank,
            compute_seconds=compute_seconds,
            message_seconds=message_seconds,
            transfer_seconds=transfer_seconds,
        )
        if best is None or t < best[0] * (1 - 1e-9):
            best = (t, m)
    if best is None:
        raise ValueError(
            f"no micro-batch count up to {limit} divides batch_size={batch_size} under schedule={schedule_name(schedule)!r} "
            f"on {pp_size} ranks: use a batch size that is a multiple of {pp_size}, or schedule='gpipe'."
        )
    return best[1]
