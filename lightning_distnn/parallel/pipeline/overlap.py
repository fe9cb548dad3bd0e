"""Transfers hidden behind compute: every training schedule on torch's action runtime, receives posted early.

torch's single-stage GPipe and 1F1B post each receive right before the compute that needs it, and
1F1B waits on its sends fused with the next receive, so every message's latency sits on the
critical path. torch's action runtime (``_PipelineScheduleRuntime``, used by the looped and V
schedules) posts a receive where its ``RECV`` action stands and waits on it only in the compute
that uses it, and waits on its sends once, at the end of the step. :func:`overlapped_schedule`
runs every training schedule on that runtime (GPipe and 1F1B from the compute orders below, the
same task order per stage as torch's own classes, so the numerics are identical) and moves every
receive to the start of the step (:func:`early_receives`): each micro-batch's activation or
gradient lands in its own buffer while the rank computes, and the compute that needs it finds it
there.

Why moving receives is safe: a posted receive does not block, and a rank's receives keep their
relative order, so they match its peers' sends (gloo and NCCL match a pair's messages in posting
order) exactly as before; waits stay at the compute that needs the data, so the dependency graph
only loosens. Each micro-batch has its own receive buffer in the stage, used once per step.

Private torch API (checked against torch 2.14.1, ``torch/distributed/pipelining/schedules.py``):
``_PipelineScheduleRuntime``, its ``_prepare_schedule_with_comms(actions)`` and
``pipeline_order_with_comms``, and ``_Action``/``_ComputationType``. If torch renames them,
``overlapped_schedule`` raises ``AttributeError``/``ImportError`` when the first schedule is built;
``Pipeline(overlap=False)`` (strategy ``overlap=False``) runs torch's own classes instead.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as _torch_schedules

_Action = getattr(_torch_schedules, "_Action", None)
_Type = getattr(_torch_schedules, "_ComputationType", None)
RECEIVES = (_Type.RECV_F, _Type.RECV_B) if _Type is not None else ()


def overlap_supported() -> bool:
    """Whether this torch has the private action runtime :func:`overlapped_schedule` needs (the runtime falls
    back to torch's own schedule classes, with a warning, where it does not)."""
    return _Action is not None and _Type is not None and hasattr(_torch_schedules, "_PipelineScheduleRuntime")


def gpipe_order(rank: int, microbatches: int) -> list:
    """GPipe's compute order on the stage of ``rank`` (one stage per rank): every forward, then every backward."""
    return [_Action(rank, _Type.FORWARD, i) for i in range(microbatches)] + [
        _Action(rank, _Type.FULL_BACKWARD, i) for i in range(microbatches)
    ]


def one_f_one_b_order(rank: int, microbatches: int, num_stages: int) -> list:
    """1F1B's compute order on the stage of ``rank``, as torch's ``Schedule1F1B`` runs it.

    ``min(m, stages - rank)`` warm-up forwards, then backward/forward pairs, then the remaining backwards.
    """
    warmup = min(microbatches, num_stages - rank)
    order = [_Action(rank, _Type.FORWARD, i) for i in range(warmup)]
    forward, backward = warmup, 0
    while backward < microbatches:
        order.append(_Action(rank, _Type.FULL_BACKWARD, backward))
        backward += 1
        if forward < microbatches:
            order.append(_Action(rank, _Type.FORWARD, forward))
            forward += 1
    return order


_KINDS = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}


@functools.lru_cache(maxsize=512)
def compute_orders(schedule: str, pp_size: int, microbatches: int,
                   stages_per_rank: int = 1) -> Optional[dict[int, tuple[tuple[str, int, int], ...]]]:
    """Every pp rank's compute tasks in the order the runtime runs them, as ``(kind, stage, microbatch)``.

    GPipe and 1F1B from :func:`gpipe_order` / :func:`one_f_one_b_order`; the multi-stage schedules
    from torch's own ``pipeline_order``, built on placeholder stages by
    ``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops`` (private; ``None`` where
    this torch lacks it or rejects the counts: callers fall back to a closed form). For the
    planner's schedule replay (:func:`lightning_distnn.planner.cost.predict`), so no process group.
    """
    from lightning_distnn.parallel.pipeline.schedules import SCHEDULES, SINGLE_STAGE, schedule_name

    name = schedule_name(schedule)
    if not overlap_supported():
        return None
    if name in SINGLE_STAGE:
        build = gpipe_order if name == "gpipe" else (lambda r, m: one_f_one_b_order(r, m, pp_size))
        ranks = {r: build(r, microbatches) for r in range(pp_size)}
    else:
        try:
            from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

            ops = get_schedule_ops(SCHEDULES[name], pp_size, microbatches, stages_per_rank)
        except Exception:  # an older torch, or counts its schedule refuses
            return None
        ranks = dict(enumerate(ops))
    out = {}
    for rank, actions in ranks.items():
        tasks = []
        for a in actions:
            kind = _KINDS.get(getattr(getattr(a, "computation_type", None), "name", ""))
            if kind is not None:
                tasks.append((kind, a.stage_index, a.microbatch_index))
        out[rank] = tuple(tasks)
    return out


def early_receives(actions: list) -> list:
    """The same action list with every receive moved to its front, the receives in their original order."""
    receives = [a for a in actions if a.computation_type in RECEIVES]
    return receives + [a for a in actions if a.computation_type not in RECEIVES]


def overlapped_schedule(
    cls: type, stages: list[PipelineStage], microbatches: int, loss_fn: Optional[Callable]
) -> Any:
    """A training schedule equivalent to ``cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)`` on
    torch's action runtime, with early receives (see the module docstring)."""
    runtime = _torch_schedules._PipelineScheduleRuntime
    if issubclass(cls, runtime):
        schedule = cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        num_stages = stages[0].num_stages
        if cls is _torch_schedules.ScheduleGPipe:
            orders = {r: gpipe_order(r, microbatches) for r in range(num_stages)}
        elif cls is _torch_schedules.Schedule1F1B:
            orders = {r: one_f_one_b_order(r, microbatches, num_stages) for r in range(num_stages)}
        else:
            raise ValueError(f"overlapped_schedule has no compute order for {cls.__name__}; use overlap=False.")
        schedule = runtime(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
        schedule._prepare_schedule_with_comms(orders)
    schedule.pipeline_order_with_comms = {
        rank: early_receives(actions) for rank, actions in schedule.pipeline_order_with_comms.items()
    }
    return schedule
