"""Pipeline parallelism on ``torch.distributed.pipelining``: stages, schedules, checks, timeline.

Pure torch, no Lightning. :func:`apply_pipeline` takes an ``nn.Sequential``, a
:class:`~lightning_distnn.partition.model.StagePlan` and the pipeline (``pp``) process group, and
returns a :class:`Pipeline`: this rank's :class:`~torch.distributed.pipelining.PipelineStage`
objects and the schedule that drives them. One call of :meth:`Pipeline.train_step` runs the
forward *and* backward of every micro-batch (the schedule's task graph of F, B, I and W tasks) and
leaves the summed gradients in the stage parameters, ready for ``optimizer.step()``.

Stage placement (``stage_ranks``):

* single-stage schedules (``gpipe``, ``1f1b``): stage ``s`` on pp rank ``s``;
* looped schedules (``interleaved_1f1b``, ``looped_bfs``, ``interleaved_zero_bubble``) with
  ``v`` stages per rank: stage ``s`` on rank ``s % pp``;
* V schedules (``zbv_zero_bubble``, ``dualpipev``, exactly 2 stages per rank): rank ``r`` holds
  stages ``r`` and ``2*pp - 1 - r``, so the first and the last stage both live on rank 0.

Composition (the hybrid strategy): ``dp_group`` averages each stage's gradients over the
data-parallel replicas after the schedule step; ``stage_transform`` is applied to each stage
module before it is wrapped (e.g. tensor parallelism).

Timeline: every F/B/I/W task each local stage runs is recorded (:class:`TaskRecord`), so the
schedule can be drawn (:mod:`lightning_distnn.pipeline_viz`) and its bubble measured.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from lightning_distnn.parallel.collectives import flat_average_
from lightning_distnn.partition.model import StagePlan

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


def check_microbatches(
    batch_size: int,
    microbatches: int,
    *,
    schedule: str,
    pp_size: int,
    num_stages: int,
    where: str = "the training batch",
) -> None:
    """Raise ``ValueError`` (naming the fix) when a batch cannot run under the schedule."""
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches={microbatches!r} must be a positive integer.")
    need = min_microbatches(schedule, pp_size, num_stages)
    if microbatches < need:
        raise ValueError(
            f"schedule={schedule_name(schedule)!r} with {num_stages} stages on {pp_size} pipeline ranks needs at least "
            f"{need} micro-batches, got microbatches={microbatches}: raise microbatches to {need} or more "
            "(and the batch size with it), or pick schedule='gpipe'."
        )
    if schedule_name(schedule) in LOOPED + ("zbv_zero_bubble",):
        rounds = max(1, microbatches // pp_size)
        if microbatches % rounds:
            raise ValueError(
                f"schedule={schedule_name(schedule)!r} runs micro-batches in rounds of {pp_size} (the pp degree): "
                f"microbatches={microbatches} is not a multiple of its {rounds} rounds. Use a multiple of {pp_size} "
                f"(e.g. {rounds * pp_size}) or fewer than {pp_size}."
            )
    if batch_size % microbatches:
        lower = batch_size - batch_size % microbatches
        raise ValueError(
            f"{where} has {batch_size} samples, which do not split into microbatches={microbatches} equal "
            f"micro-batches (pipelining needs equal micro-batches): use a batch size that is a multiple of "
            f"{microbatches} (e.g. {lower or microbatches} or {lower + microbatches}), or set drop_last=True on the "
            "training DataLoader so the last short batch is dropped."
        )


def theoretical_bubble(schedule: str, pp_size: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a rank in the ideal schedule (equal stage costs, free communication).

    ``(p-1)/(m+p-1)`` for GPipe and 1F1B; ``(p-1)/(v*m+p-1)`` for the looped schedules
    (interleaved 1F1B, looped BFS) with ``v`` stages per rank; 0 for ZB-V (its claim when the
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
        return (p - 1) / (v * m + p - 1)
    if schedule == "zbv_zero_bubble":
        return 0.0
    return math.nan


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



def _record_tasks(stage: PipelineStage, timeline: Timeline) -> None:
    """Time this stage's F/B/I/W tasks into ``timeline`` (wraps the stage's task methods)."""
    index = stage.stage_index
    forward, backward, backward_weight = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

    def timed_forward(fwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = forward(fwd_chunk_id, *args, **kwargs)
        timeline.add(index, fwd_chunk_id, "F", start, time.perf_counter())
        return out

    def timed_backward(bwd_chunk_id, *args, **kwargs):
        full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
        start = time.perf_counter()
        out = backward(bwd_chunk_id, *args, **kwargs)
        timeline.add(index, bwd_chunk_id, "B" if full else "I", start, time.perf_counter())
        return out

    def timed_backward_weight(bwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = backward_weight(bwd_chunk_id, *args, **kwargs)
        timeline.add(index, bwd_chunk_id, "W", start, time.perf_counter())
        return out

    stage.forward_one_chunk = timed_forward
    stage.backward_one_chunk = timed_backward
    stage.backward_weight_one_chunk = timed_backward_weight


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def _send_tensor(t: torch.Tensor, group_dst: int, group: dist.ProcessGroup) -> None:
    if t.dim() > 8:
        raise ValueError(f"stage outputs of more than 8 dims are not supported in evaluation, got {t.dim()}.")
    header = torch.zeros(10, dtype=torch.int64)
    header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
    header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header.to(t.device), group=group, group_dst=group_dst)
    dist.send(t.contiguous(), group=group, group_dst=group_dst)


def _recv_tensor(group_src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    header = torch.zeros(10, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=group_src)
    header = header.cpu()
    shape = [int(d) for d in header[2 : 2 + int(header[0])]]
    out = torch.empty(shape, dtype=_DTYPES[int(header[1])], device=device)
    dist.recv(out, group=group, group_src=group_src)
    return out


def stage_module(net: nn.Sequential, layers: list[int]) -> nn.Sequential:
    """The layers of one stage as an ``nn.Sequential`` that keeps their original indices as names."""
    return nn.Sequential(OrderedDict((str(i), net[i]) for i in layers))


class Pipeline:
    """This rank's part of a pipeline: its stage modules, PipelineStages and schedule.

    Built by :func:`apply_pipeline`. ``train_step(x, y)`` runs one schedule step (forward and
    backward of every micro-batch) and returns the merged output of the last stage (``None``
    on ranks without it); ``forward(x)`` runs a forward-only pass (no loss, no gradients).
    """

    def __init__(
        self,
        *,
        plan: StagePlan,
        modules: list[nn.Module],
        stage_indices: list[int],
        schedule: str,
        microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        group: dist.ProcessGroup,
        device: torch.device,
        dp_group: Optional[dist.ProcessGroup],
        record_timeline: bool,
    ) -> None:
        self.plan = plan
        self.modules = modules
        self.stage_indices = stage_indices
        self.schedule_name = schedule
        self.microbatches = microbatches
        self.group = group
        self.dp_group = dp_group
        self.device = device
        self.pp_size = dist.get_world_size(group)
        self.pp_rank = dist.get_rank(group)
        self.num_stages = plan.num_stages
        self.stages_per_rank = len(stage_indices)
        self.is_first = 0 in stage_indices
        self.is_last = self.num_stages - 1 in stage_indices
        self.last_rank = plan.stage_ranks[-1]
        self.user_loss_fn = loss_fn
        # the schedule sums micro-batch gradients; dividing each loss by grad_divisor makes that sum the
        # gradient of the mean loss over the batch (and over accumulated batches)
        self.grad_divisor = float(microbatches)
        self.timeline = Timeline(rank=dist.get_rank())
        self.record_timeline = record_timeline
        self._io_bytes: dict[int, tuple[int, int]] = {}
        for index, module in zip(stage_indices, modules):
            module.register_forward_hook(self._io_hook(index))
        # torch infers the p2p buffer shapes at a stage's first step: one set of stages and schedule
        # per (mode, micro-batch size), so a short last batch or an eval batch gets its own
        self._runners: dict[tuple[str, int], tuple[list[PipelineStage], Any]] = {}
        self.grad_compression: Optional[str] = None  # "fp16" / "bf16": the dp all-reduce in half precision

    # ---- construction -------------------------------------------------------------------
    def _runner(self, mode: str, micro_size: int) -> tuple[list[PipelineStage], Any]:
        key = (mode, micro_size)
        if key not in self._runners:
            stages = self._make_stages()
            if mode == "train" and self.record_timeline:
                for stage in stages:
                    _record_tasks(stage, self.timeline)
            self._runners[key] = (stages, self._make_schedule(stages, self._scaled_loss if mode == "train" else None))
        return self._runners[key]

    def _make_stages(self) -> list[PipelineStage]:
        return [
            PipelineStage(module, index, self.num_stages, self.device, group=self.group)
            for index, module in zip(self.stage_indices, self.modules)
        ]

    def _make_schedule(self, stages: list[PipelineStage], loss_fn: Optional[Callable]) -> Any:
        cls = SCHEDULES[self.schedule_name]
        target = stages[0] if self.schedule_name in SINGLE_STAGE else stages
        return cls(target, self.microbatches, loss_fn=loss_fn, scale_grads=False)

    def _scaled_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.user_loss_fn(outputs, targets) / self.grad_divisor

    def _io_hook(self, index: int):
        def hook(module, inputs, output):
            self._io_bytes[index] = (_nbytes(inputs), _nbytes(output))

        return hook

    # ---- running ------------------------------------------------------------------------
    def _check(self, batch_size: int, where: str) -> None:
        check_microbatches(
            batch_size,
            self.microbatches,
            schedule=self.schedule_name,
            pp_size=self.pp_size,
            num_stages=self.num_stages,
            where=where,
        )

    def train_step(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Forward + backward of every micro-batch; gradients accumulate into the stage parameters.

        ``x`` is needed on the rank holding the first stage, ``y`` on the rank holding the last;
        pass both on every rank (the batch size is checked everywhere before any communication). Gradients are averaged over ``dp_group`` afterwards.
        """
        reference = x if x is not None else y
        self._check(reference.shape[0], "the training batch")
        _, schedule = self._runner("train", reference.shape[0] // self.microbatches)
        if self.record_timeline:
            self.timeline.begin_step()
        output = schedule.step(
            *((x,) if self.is_first else ()),
            target=y if self.is_last else None,
        )
        if self.record_timeline:
            self.timeline.end_step()
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            self.allreduce_gradients()
        return output

    def allreduce_gradients(self) -> None:
        """Average the stage gradients over the data-parallel group (one flat all-reduce).

        Tensor-parallel (DTensor) gradients are reduced through their local shards: the dp peers of
        a rank hold the same shard. ``grad_compression`` ("fp16"/"bf16") sends the buffer in half
        precision.
        """
        grads = [p.grad for m in self.modules for p in m.parameters() if p.grad is not None]
        wire = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.grad_compression or "")
        flat_average_(grads, group=self.dp_group, wire_dtype=wire)

    @torch.no_grad()
    def forward(self, x: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
        """Forward-only pass of a batch of ``batch_size`` samples (padded to a multiple of the micro-batches).

        Runs separate forward-only stages over the same modules, so evaluation never disturbs the
        training schedule's state. Returns the output on the last stage's rank, else ``None``.
        """
        pad = (-batch_size) % self.microbatches
        if self.is_first and x is not None and pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        if self.schedule_name in V_SHAPED:
            # torch's V-schedule runtime runs its backward actions even in eval mode and fails:
            # evaluate by sending each micro-batch's activations stage to stage instead
            output = self._forward_p2p(x)
        else:
            _, schedule = self._runner("eval", (batch_size + pad) // self.microbatches)
            output = schedule.eval(*((x,) if self.is_first else ()))
        if output is not None and pad:
            output = output[:batch_size]
        return output

    def _forward_p2p(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Forward-only pass: micro-batch by micro-batch, stage by stage, activations sent point to point."""
        ranks = self.plan.stage_ranks
        local = dict(zip(self.stage_indices, self.modules))
        chunks = list(x.chunk(self.microbatches)) if self.is_first and x is not None else [None] * self.microbatches
        outputs = []
        for chunk in chunks:
            act = chunk
            for s in range(self.num_stages):
                if ranks[s] != self.pp_rank:
                    continue
                if s > 0 and ranks[s - 1] != self.pp_rank:
                    act = _recv_tensor(ranks[s - 1], self.group, self.device)
                act = local[s](act)
                if s < self.num_stages - 1 and ranks[s + 1] != self.pp_rank:
                    _send_tensor(act, ranks[s + 1], self.group)
            if self.is_last:
                outputs.append(act)
        return torch.cat(outputs) if self.is_last else None

    def broadcast_output(self, output: Optional[torch.Tensor]) -> torch.Tensor:
        """The last stage's output on every rank of the pp group (broadcast from its rank)."""
        if self.pp_size == 1:
            return output
        header = torch.zeros(10, dtype=torch.int64, device=self.device)
        if self.pp_rank == self.last_rank:
            header[0], header[1] = output.dim(), _DTYPES.index(output.dtype)
            header[2 : 2 + output.dim()] = torch.tensor(output.shape, dtype=torch.int64)
        dist.broadcast(header, group=self.group, group_src=self.last_rank)
        header = header.cpu()
        if self.pp_rank != self.last_rank:
            shape = [int(d) for d in header[2 : 2 + int(header[0])]]
            output = torch.empty(shape, dtype=_DTYPES[int(header[1])], device=self.device)
        output = output.detach().contiguous()
        dist.broadcast(output, group=self.group, group_src=self.last_rank)
        return output

    # ---- accounting ---------------------------------------------------------------------
    def comm_bytes_per_step(self, training: bool = True) -> dict[str, int]:
        """Bytes this rank sends and receives between stages in one step (from the shapes seen).

        Per micro-batch, an activation crosses every stage boundary whose two stages sit on
        different ranks, and in training its gradient crosses back. Counted from the input and
        output sizes each local stage saw in its last forward, times the micro-batches; the
        gradient all-reduce over ``dp_group`` (if any) is reported as ``allreduce``.
        """
        ranks = self.plan.stage_ranks
        sent = received = 0
        for index in self.stage_indices:
            if index not in self._io_bytes:
                continue
            in_bytes, out_bytes = self._io_bytes[index]
            if index > 0 and ranks[index - 1] != self.pp_rank:
                received += in_bytes
                sent += in_bytes if training else 0
            if index < self.num_stages - 1 and ranks[index + 1] != self.pp_rank:
                sent += out_bytes
                received += out_bytes if training else 0
        out = {"sent": sent * self.microbatches, "received": received * self.microbatches}
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            n = dist.get_world_size(self.dp_group)
            params = sum(p.numel() * p.element_size() for m in self.modules for p in m.parameters())
            out["allreduce"] = int(2 * (n - 1) / n * params)
        return out

    def bubble(self) -> dict[str, float]:
        """Measured idle fraction of this rank (mean over the kept steps but the first) and the theory."""
        steps = sorted(s for s, (_, e) in self.timeline.spans.items() if not math.isnan(e))
        if len(steps) > 1:
            steps = steps[1:]  # the first step includes shape inference and warm-up
        values = [self.timeline.bubble(s) for s in steps]
        measured = sum(values) / len(values) if values else math.nan
        theory = theoretical_bubble(self.schedule_name, self.pp_size, self.microbatches, self.stages_per_rank)
        return {"measured": measured, "theory": theory}


def clip_grad_norm_across(
    parameters: list[torch.Tensor], max_norm: float, *, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """``clip_grad_norm_`` (2-norm) with the norm taken over the parameters of every rank in ``group``.

    Each pipeline rank holds different parameters: the squared local norms are summed over the
    group, so every stage scales by the same ``max_norm / (total_norm + 1e-6)`` (capped at 1),
    as one process clipping the whole model would.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squared += g.detach().float().pow(2).sum()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype))
    return total


def apply_pipeline(
    net: nn.Sequential,
    plan: StagePlan,
    *,
    group: dist.ProcessGroup,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: str = "1f1b",
    microbatches: int = 4,
    dp_group: Optional[dist.ProcessGroup] = None,
    stage_transform: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
    record_timeline: bool = True,
) -> Pipeline:
    """Build this rank's pipeline stages of ``net`` under ``plan`` over the pp ``group``.

    ``plan.num_stages`` must be ``pp_size x stages_per_rank`` of the schedule; the stage modules
    share their layers (parameters) with ``net``, so an optimizer over ``Pipeline.modules``
    trains ``net``'s layers in place. The plan's ``stage_ranks`` are filled in here.
    """
    name = schedule_name(schedule)
    pp_size, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    if plan.num_layers != len(net):
        raise ValueError(f"the plan covers {plan.num_layers} layers, the network has {len(net)}.")
    per_rank = resolve_stages_per_rank(name, None if name in LOOPED else plan.num_stages // pp_size)
    if plan.num_stages % pp_size or (name not in LOOPED and plan.num_stages != per_rank * pp_size):
        raise ValueError(
            f"schedule={name!r} on {pp_size} pipeline ranks needs {per_rank * pp_size} stages "
            f"({per_rank} per rank), the plan has {plan.num_stages}."
        )
    check_microbatches(microbatches, microbatches, schedule=name, pp_size=pp_size, num_stages=plan.num_stages)
    plan.stage_ranks = stage_ranks(name, plan.num_stages, pp_size)
    indices = local_stage_indices(name, plan.num_stages, pp_size, pp_rank)
    modules: list[nn.Module] = []
    for index in indices:
        module: nn.Module = stage_module(net, plan.stages[index]).to(device)
        if stage_transform is not None:
            module = stage_transform(module) or module
        modules.append(module)
    return Pipeline(
        plan=plan,
        modules=modules,
        stage_indices=indices,
        schedule=name,
        microbatches=microbatches,
        loss_fn=loss_fn,
        group=group,
        device=device,
        dp_group=dp_group,
        record_timeline=record_timeline,
    )
