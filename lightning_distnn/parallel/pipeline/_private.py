"""The one place the pipeline runtime touches private ``torch.distributed.pipelining`` API.

Checked against torch 2.14.1 (``torch/distributed/pipelining/stage.py``). The lead moves this
into ``lightning_distnn/_compat.py``.

:func:`wrap_stage_tasks` replaces three methods of one ``PipelineStage`` *instance* (not the
class) with timed wrappers:

* ``forward_one_chunk(fwd_chunk_id, args, kwargs, ...)``: an F task;
* ``backward_one_chunk(bwd_chunk_id, loss=None, full_backward=True, last_backward=False)``: a B
  task (``full_backward=True``) or an I task (input gradient only, zero-bubble schedules);
* ``backward_weight_one_chunk(bwd_chunk_id, last_backward=False)``: a W task.

Every schedule class (single-stage and the ``_PipelineScheduleRuntime`` ones) calls these
methods on the stage object, so the wrappers see every task. What breaks if torch changes them:
a renamed method raises ``AttributeError`` here when the stage is built (loud, at the first
step); a moved chunk-id argument (today the first positional one) or a renamed
``full_backward`` keyword mislabels tasks in the timeline (B vs I, the micro-batch index); a
schedule that stops calling these methods leaves the timeline empty (the bubble reads NaN).
Numerics never depend on this: the wrappers pass every argument and result through unchanged.
"""

from __future__ import annotations

import time
from typing import Callable

from torch.distributed.pipelining import PipelineStage

# on_task(stage_index, microbatch, kind, start, end) with kind in "F", "B", "I", "W"
TaskCallback = Callable[[int, int, str, float, float], None]


def wrap_stage_tasks(stage: PipelineStage, on_task: TaskCallback) -> None:
    """Call ``on_task`` with the wall span of every F/B/I/W task ``stage`` runs (see the module docstring)."""
    index = stage.stage_index
    forward = stage.forward_one_chunk
    backward = stage.backward_one_chunk
    backward_weight = stage.backward_weight_one_chunk

    def timed_forward(fwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = forward(fwd_chunk_id, *args, **kwargs)
        on_task(index, fwd_chunk_id, "F", start, time.perf_counter())
        return out

    def timed_backward(bwd_chunk_id, *args, **kwargs):
        full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
        start = time.perf_counter()
        out = backward(bwd_chunk_id, *args, **kwargs)
        on_task(index, bwd_chunk_id, "B" if full else "I", start, time.perf_counter())
        return out

    def timed_backward_weight(bwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = backward_weight(bwd_chunk_id, *args, **kwargs)
        on_task(index, bwd_chunk_id, "W", start, time.perf_counter())
        return out

    stage.forward_one_chunk = timed_forward
    stage.backward_one_chunk = timed_backward
    stage.backward_weight_one_chunk = timed_backward_weight
