"""Pipeline parallelism on ``torch.distributed.pipelining``, split by concern.

* :mod:`.schedules`: schedule names and classes, stage placement, micro-batch rules, the split of a
  batch of any size, the theoretical bubble (pure functions, usable before launch);
* :mod:`.timeline`: the F/B/I/W tasks each rank ran, per step, and the measured bubble;
* :mod:`.wire`: the one header + data format for tensors of unknown shape (p2p and broadcast);
* :mod:`.runtime`: :func:`apply_pipeline` -> :class:`Pipeline` (stages, cached schedules, steps),
  :func:`clip_grad_norm_across`, :func:`stage_module`;
* :mod:`.auto`: measured inputs for automatic choices (:func:`measure_link`, :func:`auto_microbatches`,
  :func:`auto_choice`: the count with its reasons);
* :mod:`.overlap`: training schedules on torch's action runtime with receives posted at the step's start;
* private torch APIs (timing a stage's tasks and its p2p waits) go through :mod:`lightning_distnn._compat`.
"""

from lightning_distnn.parallel.pipeline.auto import auto_choice, auto_microbatches, measure_link
from lightning_distnn.parallel.pipeline.runtime import Pipeline, apply_pipeline, clip_grad_norm_across, stage_module
from lightning_distnn.parallel.pipeline.schedules import (
    FALLBACK,
    LOOPED,
    SCHEDULES,
    SINGLE_STAGE,
    V_SHAPED,
    BatchSplit,
    check_microbatches,
    choose_microbatches,
    count_problem,
    local_stage_indices,
    min_microbatches,
    modelled_step_seconds,
    resolve_stages_per_rank,
    schedule_class,
    schedule_name,
    split_batch,
    stage_ranks,
    theoretical_bubble,
)
from lightning_distnn.parallel.pipeline.timeline import TaskRecord, Timeline, record_tasks
from lightning_distnn.parallel.pipeline.wire import OutputShare, broadcast_tensor, recv_tensor, send_tensor

__all__ = [
    "FALLBACK",
    "LOOPED",
    "OutputShare",
    "SCHEDULES",
    "SINGLE_STAGE",
    "V_SHAPED",
    "BatchSplit",
    "Pipeline",
    "TaskRecord",
    "Timeline",
    "apply_pipeline",
    "auto_choice",
    "auto_microbatches",
    "broadcast_tensor",
    "check_microbatches",
    "choose_microbatches",
    "clip_grad_norm_across",
    "count_problem",
    "local_stage_indices",
    "measure_link",
    "min_microbatches",
    "modelled_step_seconds",
    "recv_tensor",
    "resolve_stages_per_rank",
    "schedule_class",
    "schedule_name",
    "send_tensor",
    "split_batch",
    "stage_module",
    "stage_ranks",
    "theoretical_bubble",
]
