"""The one place the pipeline runtime touches private ``torch.distributed.pipelining`` API.

Checked against torch 2.14.1 (``torch/distributed/pipelining/stage.py`` and ``schedules.py``).
The lead moves this into ``lightning_distnn/_compat.py``. Two touches, both for the timeline only:

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

:func:`time_stage_p2p` times the stage's communication: it wraps the stage instance's public
``get_fwd_recv_ops`` / ``get_bwd_recv_ops`` / ``get_fwd_send_ops`` / ``get_bwd_send_ops`` to tag
the ``P2POp`` objects they return, and replaces, once per process, the private module function
``torch.distributed.pipelining.schedules._batch_p2p`` (through which every schedule, single-stage
and runtime, issues its point-to-point ops, also via ``_sorted_batch_p2p``) by a wrapper that
returns, for tagged ops, ``Work`` objects whose ``wait()`` is timed: time blocked receiving
(kind ``R``, with the stage it came from; a batch that mixes sends and a receive, as 1F1B's
steady state does, counts as receiving: its sends complete only when the peer is ready) and
sending (kind ``S``: posting, and waiting on a batch of sends only). Untagged ops
(other stages, other code) pass through untouched. What breaks if torch changes: a renamed or
removed ``_batch_p2p`` leaves the communication untimed (we check for it and then skip the
patch: the timeline shows compute only); a schedule that calls something other than ``wait()``
on the works (today only ``wait()`` is called, in ``_wait_batch_p2p`` and the schedules) would
need the wrapper to forward it (``__getattr__`` forwards everything else).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as _schedules

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


# on_comm(stage_index, peer_stage, microbatch, kind, start, end) with kind "R" (receive) or "S" (send)
CommCallback = Callable[[int, int, int, str, float, float], None]
_TAG = "_distnn_timing"  # attribute set on the P2POp objects of instrumented stages


class _TimedWork:
    """A ``dist.Work`` whose ``wait()`` reports its blocked time to the op's callback."""

    def __init__(self, work: Any, tag: tuple) -> None:
        self._work, self._tag = work, tag

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        on_comm, stage, peer, mb, kind = self._tag
        on_comm(stage, peer, mb, kind, start, time.perf_counter())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _install_batch_p2p_timing() -> bool:
    original = getattr(_schedules, "_batch_p2p", None)
    if original is None:
        return False
    if getattr(original, "_distnn_timed", False):
        return True

    def timed_batch_p2p(p2p_ops, desc=None):
        tags = [getattr(op, _TAG, None) for op in p2p_ops]
        if not any(tags):
            return original(p2p_ops, desc=desc)
        start = time.perf_counter()
        works = original(p2p_ops, desc=desc)
        end = time.perf_counter()
        sends = [t for t in tags if t is not None and t[4] == "S"]
        recv = [t for t in tags if t is not None and t[4] == "R"]
        if sends:  # posting a batch with sends (gloo may block here): sending, or receiving if it has a receive
            on_comm, stage, peer, mb, kind = (recv or sends)[0]
            on_comm(stage, peer, mb, kind, start, end)
        if recv or len(works) != len(p2p_ops):
            # a batch with a receive is waited on as a unit (the sends in it complete when the peer posts
            # its matching receive): all of its wait is blocked receiving; a coalesced batch (NCCL) has one work
            tag = (recv or sends)[0]
            return [_TimedWork(w, tag) for w in works]
        return [w if t is None else _TimedWork(w, t) for w, t in zip(works, tags)]

    timed_batch_p2p._distnn_timed = True
    _schedules._batch_p2p = timed_batch_p2p
    return True


def time_stage_p2p(stage: PipelineStage, on_comm: CommCallback) -> bool:
    """Time the point-to-point traffic of ``stage`` (see the module docstring); False if torch lacks the hook."""
    if not _install_batch_p2p_timing():
        return False
    index = stage.stage_index
    getters = {
        "get_fwd_recv_ops": ("R", index - 1),
        "get_bwd_recv_ops": ("R", index + 1),
        "get_fwd_send_ops": ("S", index + 1),
        "get_bwd_send_ops": ("S", index - 1),
    }
    for name, (kind, peer) in getters.items():
        original = getattr(stage, name)

        def tagged(chunk_id, *args, _original=original, _kind=kind, _peer=peer, **kwargs):
            ops = _original(chunk_id, *args, **kwargs)
            for op in ops:
                if isinstance(op, dist.P2POp):
                    setattr(op, _TAG, (on_comm, index, _peer, chunk_id, _kind))
            return ops

        setattr(stage, name, tagged)
    return True
