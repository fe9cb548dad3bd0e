"""The pipeline runtime: this rank's stages, their cached schedules, and one step of them.

Pure torch, no Lightning. :func:`apply_pipeline` takes an ``nn.Sequential``, a
:class:`~lightning_distnn.partition.model.StagePlan` and the pipeline (``pp``) process group, and
returns a :class:`Pipeline`: this rank's :class:`~torch.distributed.pipelining.PipelineStage`
objects and the schedule that drives them. One call of :meth:`Pipeline.train_step` runs the
forward *and* backward of every micro-batch (the schedule's task graph of F, B, I and W tasks) and
leaves the summed gradients in the stage parameters, ready for ``optimizer.step()``.

Batches of any size: a batch runs as equal micro-batches, as many as possible up to the configured
count (:func:`~lightning_distnn.parallel.pipeline.schedules.split_batch`; a schedule per split,
built once and cached), and each micro-batch loss is divided by the count actually used, so the
summed gradient is that of the mean loss over the batch whatever the split. Stage placement:
:func:`~lightning_distnn.parallel.pipeline.schedules.stage_ranks`.

Composition (:func:`lightning_distnn.parallel.parallelize.parallelize`): ``stage_transform`` is
applied to each stage module before it is wrapped (tensor parallelism); the data-parallel gradient
sync of the stages is the composer's (``GradientSync``), after :meth:`Pipeline.train_step`.

Timeline: every F/B/I/W task each local stage runs, and its receive waits and sends, are recorded
(:class:`~lightning_distnn.parallel.pipeline.timeline.TaskRecord`), so the schedule can be drawn
(:mod:`lightning_distnn.pipeline_viz`), its bubble measured and the step's time broken down
(:meth:`Pipeline.breakdown`).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from lightning_distnn.parallel.pipeline.schedules import (
    LOOPED,
    SCHEDULES,
    SINGLE_STAGE,
    V_SHAPED,
    BatchSplit,
    check_microbatches,
    local_stage_indices,
    resolve_stages_per_rank,
    schedule_name,
    split_batch,
    stage_ranks,
    theoretical_bubble,
)
from lightning_distnn.parallel.pipeline.overlap import overlap_supported, overlapped_schedule
from lightning_distnn.parallel.pipeline.timeline import Timeline, record_tasks, structural_bubble
from lightning_distnn.parallel.pipeline.wire import OutputShare, broadcast_tensor, recv_tensor, send_tensor
from lightning_distnn.partition.model import StagePlan


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def stage_module(net: nn.Sequential, layers: list[int]) -> nn.Sequential:
    """The layers of one stage as an ``nn.Sequential`` that keeps their original indices as names."""
    return nn.Sequential(OrderedDict((str(i), net[i]) for i in layers))


class Pipeline:
    """This rank's part of a pipeline: its stage modules, PipelineStages and schedule.

    Built by :func:`apply_pipeline`. ``train_step(x, y)`` runs one schedule step (forward and
    backward of every micro-batch) and returns the merged output of the last stage (``None``
    on ranks without it); ``forward(x, n)`` runs a forward-only pass (no loss, no gradients).
    Both take a batch of any size (see the module docstring).

    ``accumulate_grad_batches`` (default 1): the caller accumulates gradients over that many
    batches; each batch's loss is divided by it too, as Lightning does for one process.
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
        record_timeline: bool,
    ) -> None:
        self.plan = plan
        self.modules = modules
        self.stage_indices = stage_indices
        self.schedule_name = schedule
        self.microbatches = microbatches
        self.group = group
        self.device = device
        self.pp_size = dist.get_world_size(group)
        self.pp_rank = dist.get_rank(group)
        self.num_stages = plan.num_stages
        self.stages_per_rank = len(stage_indices)
        self.is_first = 0 in stage_indices
        self.is_last = self.num_stages - 1 in stage_indices
        self.last_rank = plan.stage_ranks[-1]
        self.user_loss_fn = loss_fn
        self.accumulate_grad_batches = 1
        # the schedule sums micro-batch gradients; dividing each micro-batch loss by (count used x
        # accumulate_grad_batches) makes that sum the gradient of the mean loss over the batch
        self._loss_divisor = float(microbatches)
        self.last_split: Optional[BatchSplit] = None
        self.last_loss: Optional[torch.Tensor] = None
        self._last_batch: Optional[tuple[str, int]] = None  # (mode, batch size) of the last step
        self._output_like: dict[tuple[str, int], tuple[tuple[int, ...], torch.dtype]] = {}
        self._share = OutputShare(group, self.last_rank, device)
        self.timeline = Timeline(rank=dist.get_rank())
        self.record_timeline = record_timeline
        # training schedules on torch's action runtime with receives posted at the step's start (.overlap)
        self.overlap = True
        self._io_bytes: dict[int, tuple[int, int]] = {}
        for index, module in zip(stage_indices, modules):
            module.register_forward_hook(self._io_hook(index))
        # torch infers the p2p buffer shapes at a stage's first step: one set of stages and schedule per
        # (mode, schedule, micro-batch count, micro-batch size), so a short last batch or an eval batch gets its own
        self._runners: dict[tuple[str, str, int, int], tuple[list[PipelineStage], Any]] = {}
        self._building_steps: set[int] = set()  # timeline steps that built a schedule (not measured)

    @property
    def grad_divisor(self) -> float:
        """Configured micro-batches x ``accumulate_grad_batches`` (the divisor of a full batch's micro-batch losses)."""
        return float(self.microbatches * self.accumulate_grad_batches)

    @grad_divisor.setter
    def grad_divisor(self, value: float) -> None:
        # older callers set microbatches x accumulate_grad_batches: keep the accumulation part
        self.accumulate_grad_batches = max(1, round(float(value) / self.microbatches))

    # ---- construction -------------------------------------------------------------------
    def split(self, batch_size: int) -> BatchSplit:
        """How a batch of ``batch_size`` samples runs (schedule, micro-batch count and size)."""
        return split_batch(
            int(batch_size),
            self.microbatches,
            schedule=self.schedule_name,
            pp_size=self.pp_size,
            num_stages=self.num_stages,
        )

    def _runner(self, mode: str, split: BatchSplit) -> tuple[list[PipelineStage], Any]:
        key = (mode, split.schedule, split.microbatches, split.micro_size)
        if key not in self._runners:
            stages = self._make_stages()
            if mode == "train" and self.record_timeline:
                for stage in stages:
                    record_tasks(stage, self.timeline)
            if mode == "train" and self.overlap and not overlap_supported():
                warnings.warn(
                    f"torch {torch.__version__} lacks the pipeline action runtime that overlap=True uses: running "
                    "torch's own schedule classes (overlap=False)."
                )
                self.overlap = False
            if mode == "train" and self.overlap:
                schedule = overlapped_schedule(SCHEDULES[split.schedule], stages, split.microbatches, self._scaled_loss)
            else:
                schedule = self._make_schedule(stages, split, self._scaled_loss if mode == "train" else None)
            self._runners[key] = (stages, schedule)
        return self._runners[key]

    def _make_stages(self) -> list[PipelineStage]:
        return [
            PipelineStage(module, index, self.num_stages, self.device, group=self.group)
            for index, module in zip(self.stage_indices, self.modules)
        ]

    def _make_schedule(self, stages: list[PipelineStage], split: BatchSplit, loss_fn: Optional[Callable]) -> Any:
        cls = SCHEDULES[split.schedule]
        target = stages[0] if split.schedule in SINGLE_STAGE else stages
        return cls(target, split.microbatches, loss_fn=loss_fn, scale_grads=False)

    def _scaled_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.user_loss_fn(outputs, targets) / self._loss_divisor

    def _io_hook(self, index: int):
        def hook(module, inputs, output):
            self._io_bytes[index] = (_nbytes(inputs), _nbytes(output))

        return hook

    # ---- running ------------------------------------------------------------------------
    def train_step(
        self,
        x: Optional[torch.Tensor],
        y: Optional[torch.Tensor],
        *,
        return_outputs: bool = True,
        share_output: bool = False,
    ) -> Optional[torch.Tensor]:
        """Forward + backward of every micro-batch; gradients accumulate into the stage parameters.

        ``x`` is needed on the rank holding the first stage, ``y`` on the rank holding the last;
        every rank needs one of them for the batch size, which decides the split (pass both on
        every rank). The batch may have any size (:meth:`split`); the gradient is that of the
        mean loss over its samples, divided by ``accumulate_grad_batches``. On the last stage's rank, ``last_loss`` is then the batch's
        mean loss (undivided); ``return_outputs=False`` skips merging the output micro-batches
        (for a caller that needs the loss only). ``share_output=True`` returns the output on every rank
        of the pipeline group (:class:`~lightning_distnn.parallel.pipeline.wire.OutputShare`: one message
        per rank and step, posted so that it arrives while the rank computes).
        """
        reference = x if x is not None else y
        if reference is None:
            raise ValueError("Pipeline.train_step needs the inputs x or the targets y on every rank (for the batch size).")
        split = self.split(reference.shape[0])
        self._last_batch = ("train", int(reference.shape[0]))
        if ("train", split.schedule, split.microbatches, split.micro_size) not in self._runners:
            self._building_steps.add(self.timeline.step + 1)
        _, schedule = self._runner("train", split)
        self.last_split = split
        self._loss_divisor = float(split.microbatches * self.accumulate_grad_batches)
        losses: list = []
        if share_output:
            self._share.post(self._last_batch)
        if self.record_timeline:
            self.timeline.begin_step()
        output = schedule.step(
            *((x,) if self.is_first else ()),
            target=y if self.is_last else None,
            losses=losses if self.is_last else None,
            return_outputs=return_outputs,
        )
        if self.record_timeline:
            self.timeline.end_step()
        # each micro-batch loss was divided by (count x accumulate_grad_batches): their sum x accumulate = the mean
        self.last_loss = sum(l.detach() for l in losses) * self.accumulate_grad_batches if losses else None
        if share_output:
            return self._share.finish(self._last_batch, output)
        return output

    def flush(self) -> None:
        """Wait for this rank's outstanding output sends (``share_output``); call before tearing the group down."""
        self._share.flush()

    @torch.no_grad()
    def forward(self, x: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
        """Forward-only pass of a batch of ``batch_size`` samples (any size: every sample once, no padding).

        Runs separate forward-only stages over the same modules, so evaluation never disturbs the
        training schedule's state. Returns the output on the last stage's rank, else ``None``.
        """
        split = self.split(batch_size)
        self._last_batch = ("eval", int(batch_size))
        if self.schedule_name in V_SHAPED:
            # torch's V-schedule runtime runs its backward actions even in eval mode and fails:
            # evaluate by sending each micro-batch's activations stage to stage instead
            return self._forward_p2p(x, split.microbatches)
        _, schedule = self._runner("eval", split)
        return schedule.eval(*((x,) if self.is_first else ()))

    def _forward_p2p(self, x: Optional[torch.Tensor], count: int) -> Optional[torch.Tensor]:
        """Forward-only pass: micro-batch by micro-batch, stage by stage, activations sent point to point."""
        ranks = self.plan.stage_ranks
        local = dict(zip(self.stage_indices, self.modules))
        chunks = list(x.chunk(count)) if self.is_first and x is not None else [None] * count
        outputs = []
        for chunk in chunks:
            act = chunk
            for s in range(self.num_stages):
                if ranks[s] != self.pp_rank:
                    continue
                if s > 0 and ranks[s - 1] != self.pp_rank:
                    act = recv_tensor(ranks[s - 1], self.group, self.device)
                act = local[s](act)
                if s < self.num_stages - 1 and ranks[s + 1] != self.pp_rank:
                    send_tensor(act, ranks[s + 1], self.group)
            if self.is_last:
                outputs.append(act)
        return torch.cat(outputs) if self.is_last else None

    def broadcast_output(self, output: Optional[torch.Tensor]) -> torch.Tensor:
        """The last stage's output of the last step (train or eval) on every rank of the pp group.

        The shape and dtype are sent once per (train/eval, batch size) (every rank knows both for
        its last step); later steps of that kind broadcast the data only.
        """
        if self.pp_size == 1:
            return output
        key = self._last_batch
        like = self._output_like.get(key)
        out = broadcast_tensor(output, self.last_rank, self.group, self.device, like=like)
        if key is not None and like is None:
            self._output_like[key] = (tuple(out.shape), out.dtype)
        return out

    # ---- accounting ---------------------------------------------------------------------
    def comm_bytes_per_step(self, training: bool = True) -> dict[str, int]:
        """Bytes this rank sends and receives between stages in one step (from the shapes seen).

        Per micro-batch, an activation crosses every stage boundary whose two stages sit on
        different ranks, and in training its gradient crosses back. Counted from the input and
        output sizes each local stage saw in its last forward, times the micro-batches; in training,
        plus the last stage's output sent to the other ranks (``share_output``, once a step has used it).
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
        if training:  # the last stage's output, shared with the other ranks (share_output, the strategies' steps)
            for kind, n in self._share.bytes_per_step().items():
                out[kind] += n
        return out

    def _measured_steps(self) -> list[int]:
        """Finished steps kept in the timeline, without those that built a schedule (shape inference, warm-up)."""
        steps = self.timeline.finished_steps()
        warm = [s for s in steps if s not in self._building_steps]
        return warm or steps

    def breakdown(self) -> dict[str, float]:
        """Where this rank's step time goes, mean seconds per step over the measured steps.

        ``span`` (the schedule step) = ``compute`` (F/B/I/W) + ``recv_wait`` (blocked receiving;
        ``recv_from_<stage>`` per source stage) + ``send`` + ``other`` (the schedule's own Python);
        ``outside`` is the time between steps outside the schedule (optimizer, the caller's loop).
        """
        return self.timeline.mean_breakdown(self._measured_steps())

    def bubble(self) -> dict[str, float]:
        """Measured idle fraction of this rank (mean over the measured steps), the theory, and the parts.

        ``measured`` = 1 - compute / span; ``recv_wait``, ``send``, ``other`` and ``outside`` are
        fractions of the span (:meth:`breakdown` has them in seconds).
        """
        values = [self.timeline.bubble(s) for s in self._measured_steps()]
        measured = sum(values) / len(values) if values else math.nan
        theory = theoretical_bubble(self.schedule_name, self.pp_size, self.microbatches, self.stages_per_rank)
        parts = self.breakdown()
        span = parts["span"]
        fractions = {k: parts[k] / span if span > 0 else math.nan for k in ("recv_wait", "send", "other", "outside")}
        return {"measured": measured, "theory": theory, **fractions}

    def structural_bubble(self, records: list, transfer: Optional[Callable[[int, int], float]] = None) -> float:
        """This rank's structural bubble (:func:`~.timeline.structural_bubble`), mean over the measured steps.

        ``records``: the task records of every rank (``PipelineStrategy.gather_timeline()``); only those of
        this rank's pipeline group are replayed (other data-parallel replicas run the same stages).
        ``transfer``: seconds per message between two stages, to replay with that link instead of free
        communication.
        """
        members = set(dist.get_process_group_ranks(self.group))
        mine = [r for r in records if r.rank in members]
        values = [structural_bubble(mine, step, transfer).get(self.timeline.rank, math.nan)
                  for step in self._measured_steps()]
        return sum(values) / len(values) if values else math.nan


def clip_grad_norm_across(
    parameters: list[torch.Tensor], max_norm: float, *, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """``clip_grad_norm_`` (2-norm) with the norm taken over the parameters of every rank in ``group``.

    Each pipeline rank holds different parameters: the squared local norms are summed over the
    group, so every stage scales by the same ``max_norm / (total_norm + 1e-6)`` (capped at 1),
    as one process clipping the whole model would.

    Tensor-parallel gradients (DTensors, a stage sharded over its tp mesh) count once each: a shard's
    squares are summed over its mesh (one all-reduce per mesh), a replicated one's taken as they are.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    sharded: dict = {}  # tp mesh -> squares of the shards this rank holds
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                raise ValueError(f"a gradient with placements {g.placements} is a partial sum: reduce it before clipping.")
            local = g.to_local().detach().float().pow(2).sum()
            if any(p.is_shard() for p in g.placements):
                sharded[g.device_mesh] = sharded.get(g.device_mesh, 0) + local
                continue
            squared += local
        else:
            squared += g.detach().float().pow(2).sum()
    for mesh, part in sharded.items():
        if mesh.ndim != 1:
            raise ValueError(f"clipping across stages handles gradients sharded over a 1-D tp mesh, got {mesh}.")
        dist.all_reduce(part, group=mesh.get_group())
        squared += part
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.detach().mul_(coef.to(local.dtype))
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
        record_timeline=record_timeline,
    )
