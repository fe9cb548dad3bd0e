"""HybridStrategy: data x pipeline x tensor parallelism on one DeviceMesh — the general model-parallel strategy.

The layout is a :class:`~lightning_distnn.mesh.ParallelDims` (``dp x pp x tp``, tp innermost); the
network is split, sharded and synchronised by one call of
:func:`lightning_distnn.parallel.parallelize.parallelize` (pipeline cut, tensor parallel per stage,
pipeline schedule, data-parallel gradient sync, in that order). :class:`PipelineStrategy`
(``tp=1``) and :class:`TensorParallelStrategy` (``pp=1``) are presets of this class.

Usage::

    Trainer(devices=4, strategy=HybridStrategy(dp=2, pp=2))                # dp2 x pp2
    Trainer(devices=4, strategy=HybridStrategy(dp=2, tp=2))                # dp2 x tp2
    Trainer(devices=10, strategy=HybridStrategy(dp=2, pp=5, microbatches=8))   # the seed's 2 x 5
    distnn-train strategy=hybrid strategy.pp=5 trainer.devices=10

What the LightningModule needs (the model-parallel contract of DESIGN.md): the network is an
``nn.Sequential`` attribute (``self.net``, or the one named by ``module_attr``) and, when ``pp > 1``,
``forward(x)`` is exactly ``self.net(x)`` and ``loss_fn(outputs, targets)`` gives the loss; batches
are ``(inputs, targets)``; automatic optimisation. Everything is checked before the first step.

With ``pp > 1`` the schedule runs forward and backward of every micro-batch inside
``training_step``; the last stage's output is broadcast over the pipeline ranks and the module's
own ``training_step`` (logging, metrics) runs on it, so what it logs reaches the logger on every
rank. With ``pp == 1`` the (sharded) network runs as an ordinary module.

On the data-parallel axis: plain all-reduce, optionally in fp16/bf16 (``compression``). The
parameter server, local SGD, PowerSGD and top-k need whole-model replicas or DDP's gradient
buckets; a hybrid replica is itself split over ``pp x tp`` ranks, so they are refused with the
reason (use the data-parallel strategies for them).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_distnn._compat import replace_norm_clipping, set_device_mesh
from lightning_distnn.mesh import ParallelDims
from lightning_distnn.parallel.chain import buffers_kept, chain_as_sequential, is_glue, splittable
from lightning_distnn.parallel.parallelize import DP_WIRE_DTYPES, ParallelNet, parallelize
from lightning_distnn.parallel.traced import TRACER_HINT, calls_pipe_split, check_split_points, cut_traced, is_split_points, network_of
from lightning_distnn.parallel.pipeline import (
    check_microbatches,
    clip_grad_norm_across,
    resolve_stages_per_rank,
    schedule_name,
)
from lightning_distnn.parallel.pipeline.auto import auto_choice, measure_link
from lightning_distnn.partition.model import (
    PARTITION_METHODS,
    explicit,
    layer_output_bytes,
    make_plan,
    profile_layer_costs,
)
from lightning_distnn.strategies._common import (
    Timeout,
    check_forward_is_network,
    loss_fn_of,
    sequential_of,
)
from lightning_distnn.strategies._pipeline_steps import LocalLayers, PipelineSteps
from lightning_distnn.strategies._example import ENTRY_POINTS, example_inputs
from lightning_distnn.strategies.base import MeshStrategy

log = logging.getLogger(__name__)

NOT_ON_HYBRID = {
    "parameter_server": "a parameter server needs whole-model replicas on the workers",
    "local_sgd": "local SGD averages whole-model replicas",
    "powersgd": "PowerSGD runs as a DDP communication hook on gradient buckets, which the hybrid does not use",
    "topk": "top-k runs as a DDP communication hook on gradient buckets, which the hybrid does not use",
}


def _degree(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        raise ValueError(f"{name}={value!r} must be a positive integer, or -1 for 'the rest'.")
    return value


class HybridStrategy(MeshStrategy):
    """dp x pp x tp training of a LightningModule whose network is an ``nn.Sequential``.

    Args:
        dp, pp, tp: parallel degrees; one of them may be ``-1`` ("the rest", default ``dp``).
        schedule: pipeline schedule (``pp > 1``): ``gpipe``, ``1f1b`` (default), ``interleaved_1f1b``,
            ``looped_bfs``, ``interleaved_zero_bubble``, ``zbv_zero_bubble``, ``dualpipev``.
        microbatches: micro-batches per batch (``pp > 1``; default 4), or ``"auto"``: chosen at setup from the
            busiest rank's measured compute and the measured p2p latency and bandwidth (:meth:`choose_microbatches`;
            the same count on every rank, a divisor of the per-replica batch; the choice and why are logged).
        stages_per_rank: stages each rank holds (looped schedules: default 2; V schedules: 2; else 1).
        partition: ``"balanced"`` (profile every layer on an example micro-batch, then the contiguous
            split minimising the slowest stage), ``"uniform"``, layer counts per stage, e.g. ``[3, 5]``,
            or module names to cut before, e.g. ``["encoder.block3"]``: split points for a network that is
            not a chain of children, traced by torch.distributed.pipelining (:mod:`~lightning_distnn.parallel.traced`).
        tp_plan: module name -> style (``colwise``, ``rowwise``, ``replicate``, ``sharded_norm``, ``pass``),
            names relative to the network, e.g. ``{"5.1": "replicate"}``; overrides the automatic plan.
        sync: ``"allreduce"`` (the only data-parallel mode that composes with pp/tp).
        compression: ``None``, ``"fp16"`` or ``"bf16"`` on the data-parallel all-reduce.
        module_attr: the LightningModule attribute holding the ``nn.Sequential`` (default: its only one).
        record_timeline: time every pipeline task (Gantt chart, bubble).
        gantt_path: if set, rank 0 draws the last training step's schedule there (PNG) at the end of
            fit; a relative path is taken relative to the Trainer's ``default_root_dir``.
        timeout: seconds any collective may wait before the job ends with an error.
        overlap: run the training schedules with every receive posted at the step's start, sends completing in
            the background (:mod:`lightning_distnn.parallel.pipeline.overlap`); ``False``: torch's own schedule
            classes (the same numerics; for comparison).
        **kwargs: passed to Lightning's ``DDPStrategy`` (``process_group_backend``, ``start_method``, ...).
    """

    strategy_name = "distnn_hybrid"

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="lightning_distnn hybrid: dp x pp x tp on one DeviceMesh", override=True)

    def __init__(
        self,
        dp: int = -1,
        pp: int = 1,
        tp: int = 1,
        schedule: Optional[str] = None,
        microbatches: Optional[Union[int, str]] = None,
        stages_per_rank: Optional[int] = None,
        partition: Union[str, Sequence[int], Sequence[str]] = "balanced",
        tp_plan: Optional[Mapping[str, str]] = None,
        sync: str = "allreduce",
        compression: Optional[str] = None,
        module_attr: Optional[str] = None,
        record_timeline: bool = True,
        gantt_path: Optional[str] = None,
        timeout: Timeout = None,
        overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        sync_name = str(sync).lower()
        wire = None if compression is None else str(compression).lower()
        wire = None if wire == "none" else wire
        if sync_name in NOT_ON_HYBRID or wire in NOT_ON_HYBRID:
            what = sync_name if sync_name in NOT_ON_HYBRID else wire
            raise ValueError(
                f"{type(self).__name__} cannot use {what!r} on its data-parallel axis: {NOT_ON_HYBRID[what]}, and each "
                "replica is split over pp x tp ranks. Use sync='allreduce' with compression None/'fp16'/'bf16', or "
                "DataParallelStrategy / ParameterServerStrategy / LocalSGDStrategy for this sync mode."
            )
        if sync_name != "allreduce":
            raise ValueError(f"Unknown sync={sync!r} for {type(self).__name__}; valid: 'allreduce'.")
        if wire not in DP_WIRE_DTYPES:
            raise ValueError(f"Unknown compression={compression!r} for {type(self).__name__}; valid: None, 'fp16', 'bf16'.")
        self.dp, self.pp, self.tp = _degree("dp", dp), _degree("pp", pp), _degree("tp", tp)
        if pp == 1 and (schedule, microbatches, stages_per_rank) != (None, None, None):
            raise ValueError(
                f"schedule={schedule!r}, microbatches={microbatches!r}, stages_per_rank={stages_per_rank!r} configure the "
                "pipeline, and pp=1 has none: set pp > 1 (or -1), or leave them unset."
            )
        if tp_plan is not None and not isinstance(tp_plan, Mapping):
            raise TypeError(
                f"the tensor-parallel plan must map module names to style names, got {type(tp_plan).__name__}: "
                "e.g. {'0.0': 'colwise'}."
            )
        super().__init__(timeout=timeout, **kwargs)
        self.schedule = schedule_name(schedule or "1f1b")
        self.stages_per_rank = resolve_stages_per_rank(self.schedule, stages_per_rank)
        microbatches = 4 if microbatches is None else microbatches
        self.auto_microbatches = isinstance(microbatches, str) and microbatches.lower() == "auto"
        if not self.auto_microbatches and (
            not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1
        ):
            raise ValueError(
                f"microbatches={microbatches!r} must be a positive integer (micro-batches per batch) or 'auto'."
            )
        # "auto": an int from setup on (choose_microbatches); None until then
        self.microbatches: Optional[int] = None if self.auto_microbatches else microbatches
        self.auto_choice: Optional[dict[str, Any]] = None
        self.partition: Union[str, list[int]]
        if isinstance(partition, str):
            if partition.lower() not in PARTITION_METHODS:
                raise ValueError(
                    f"Unknown partition={partition!r}; valid: {', '.join(PARTITION_METHODS)}, or a list of layer "
                    "counts per stage such as [3, 5]."
                )
            self.partition = partition.lower()
        else:
            self.partition = list(partition)
            check_split_points(self.partition) if is_split_points(self.partition) else explicit(self.partition)
        self.tp_overrides = dict(tp_plan) if tp_plan is not None else None
        self.sync = sync_name
        self.compression = wire
        self.module_attr = module_attr
        self.record_timeline = record_timeline
        self.gantt_path = gantt_path
        self.overlap = bool(overlap)
        self.net: Optional[ParallelNet] = None
        self._steps: Optional[PipelineSteps] = None

    # ---- layout and contract ------------------------------------------------------------------
    @override
    def layout(self, world_size: int) -> ParallelDims:
        return ParallelDims(dp=self.dp, pp=self.pp, tp=self.tp, world_size=world_size)

    def num_stages(self, dims: Optional[ParallelDims] = None) -> int:
        dims = dims or self.dims
        return dims.pp * self.stages_per_rank if dims.pp > 1 else 1

    @override
    def check_layout(self, dims: ParallelDims) -> None:
        if dims.pp == 1:
            return
        stages = self.num_stages(dims)
        if self.microbatches is not None:  # "auto" is checked when chosen, against the batch
            check_microbatches(self.microbatches, self.microbatches, schedule=self.schedule, pp_size=dims.pp, num_stages=stages)
        if isinstance(self.partition, list) and len(self.partition) + is_split_points(self.partition) != stages:
            if is_split_points(self.partition):
                raise ValueError(
                    f"partition={self.partition} names {len(self.partition)} split points, i.e. "
                    f"{len(self.partition) + 1} stages, but pp={dims.pp} x stages_per_rank={self.stages_per_rank} "
                    f"makes {stages}: name {stages - 1} modules to cut before."
                )
            raise ValueError(
                f"partition={self.partition} has {len(self.partition)} stages, but pp={dims.pp} x "
                f"stages_per_rank={self.stages_per_rank} makes {stages}: give one layer count per stage."
            )

    @override
    def check_model(self, model: pl.LightningModule) -> None:
        if not getattr(model, "automatic_optimization", True):
            raise ValueError(
                f"{type(model).__name__} uses manual optimisation; {type(self).__name__} runs the backward inside the "
                "pipeline schedule / its gradient sync and needs automatic_optimization=True."
            )
        if any(isinstance(child, LocalLayers) for child in model.children()):
            return  # already split by an earlier fit/validate of this strategy
        dims = self.dims
        _, network = self._network(model, dims)
        if dims.pp == 1 or self._traced(network):
            return  # a traced network is cut (and checked) at setup, where the example input is known
        net = chain_as_sequential(network).sequential  # the cut points (a ResNet's blocks)
        loss_fn_of(model)
        stages = self.num_stages(dims)
        if stages > len(net):
            raise ValueError(
                f"{stages} pipeline stages (pp={dims.pp} x stages_per_rank={self.stages_per_rank}) need at least "
                f"{stages} layers, {type(model).__name__}'s nn.Sequential has {len(net)}: lower pp or "
                "stages_per_rank, or split the network into more top-level blocks."
            )
        if isinstance(self.partition, list) and sum(self.partition) != len(net):
            raise ValueError(
                f"partition={self.partition} covers {sum(self.partition)} layers, the network has {len(net)}: "
                f"the counts must add up to {len(net)}."
            )

    # ---- building --------------------------------------------------------------------------
    @property
    def pipeline(self):
        """The pipeline runtime of this rank (``None`` when ``pp == 1`` or before setup)."""
        return self.net.pipeline if self.net is not None else None

    @property
    def tp_plans(self) -> list:
        """The tensor-parallel plan of every local stage (empty when ``tp == 1``)."""
        return self.net.tp_plans if self.net is not None else []

    def _profile(self, net: nn.Sequential, sample: torch.Tensor) -> list[float]:
        """Each layer's forward + backward seconds on ``sample``, measured on rank 0, the same list on every rank."""
        box = [None]
        if self.global_rank == 0:
            box[0] = profile_layer_costs(net.to(self.root_device), sample.to(self.root_device))
        dist.broadcast_object_list(box, src=0)  # one partition for all ranks
        return box[0]

    def _stage_plan(self, trainer, module: pl.LightningModule, net: nn.Sequential, example: Optional[torch.Tensor]):
        costs = None
        if self.partition == "balanced" or self.auto_microbatches:
            if example is None:
                what = "partition='balanced'" if self.partition == "balanced" else "microbatches='auto'"
                raise ValueError(
                    f"{what} profiles each layer on an example batch but found none. It is taken from "
                    f"{ENTRY_POINTS}. Give one of these, or use partition='uniform' (or a list of layer counts) "
                    "and an integer microbatches."
                )
            # auto: the whole batch (the count is not known yet; costs scale with the samples)
            micro = example if self.auto_microbatches else example[: max(1, example.shape[0] // self.microbatches)]
            costs = self._profile(net, micro)
        plan = make_plan(self.partition, len(net), self.num_stages(), costs=costs)
        if self.auto_microbatches:
            self.choose_microbatches(net, plan, example)
        return plan

    def choose_microbatches(self, net: nn.Sequential, plan, example: torch.Tensor) -> int:
        """``microbatches="auto"``: the count :func:`~lightning_distnn.parallel.pipeline.auto_microbatches` picks.

        Inputs, measured here in the training processes: the per-layer compute of the example batch
        (the per-replica batch, profiled on rank 0), the bytes each layer outputs, and the p2p latency
        and bandwidth between pipeline ranks 0 and 1 (every pipeline group measures its own pair).
        Rank 0 chooses, every rank takes its choice. Sets ``microbatches`` and ``auto_choice`` (the
        numbers and the reason, logged on rank 0) and returns the count.
        """
        dims = self.parallel_dims
        batch = int(example.shape[0])
        link = measure_link(dims.group("pp"), ranks=(0, 1), repeats=30, device=self.root_device)
        box: list[Any] = [None]
        if self.global_rank == 0:
            cut_bytes = layer_output_bytes(net.to(self.root_device), example.to(self.root_device))
            box[0] = auto_choice(
                plan, batch, cut_bytes=cut_bytes, link=link, schedule=self.schedule, pp_size=dims.pp
            )
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
        if isinstance(choice, str):  # rank 0's ValueError, raised on every rank
            raise ValueError(choice)
        self.auto_choice = choice
        self.microbatches = choice["microbatches"]
        if self.global_rank == 0:
            log.info("%s", choice["why"])
        return self.microbatches

    def _network(self, module: pl.LightningModule, dims: ParallelDims):
        try:
            return sequential_of(module, self.module_attr)
        except TypeError as err:
            # dp only (pp = tp = 1): nothing is split, any network trains as it is; a pipeline (pp > 1, tp = 1)
            # cuts any network with split points through torch's tracer
            try:
                found = network_of(module, self.module_attr) if dims.pp > 1 or dims.tp == 1 else None
            except TypeError:
                found = None
            if found is None or (dims.pp > 1 and not self._traced(found[1])):
                raise TypeError(f"{err} {TRACER_HINT}") from None
            return found

    def _traced(self, network: nn.Module) -> bool:
        return is_split_points(self.partition) or (not splittable(network) and calls_pipe_split(network))

    def _build(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        dims = self.parallel_dims
        attr, network = self._network(module, dims)
        stage_plan, holders = None, None
        net, names = network, None
        if dims.pp > 1 and self._traced(network):  # the tracer front end (parallel/traced.py); tp=1 only
            example = example_inputs(trainer, module)
            if example is None or dims.tp > 1:
                raise ValueError(f"a traced pipeline needs tp=1 (has {dims.tp}) and an example input from {ENTRY_POINTS}.")
            with buffers_kept(network):
                check_forward_is_network(module, attr, example)
            points = self.partition if is_split_points(self.partition) else ()
            (net, names), holders, stage_plan = cut_traced(network, example, split_points=points, microbatches=self.microbatches, num_stages=self.num_stages())
        elif dims.pp > 1:
            # an nn.Sequential is its own view; a chain of children (ResNet) is cut at its blocks
            net, names = chain_as_sequential(network)
            example = example_inputs(trainer, module)
            with buffers_kept(network):  # the check and the profiling must not move BatchNorm's statistics
                if example is not None:
                    check_forward_is_network(module, attr, example)
                stage_plan = self._stage_plan(trainer, module, net, example)
        self.net = parallelize(
            net,
            dims,
            device=self.root_device,
            loss_fn=loss_fn_of(module) if dims.pp > 1 else None,
            stage_plan=stage_plan,
            schedule=self.schedule,
            microbatches=self.microbatches,
            tp_plan=self.tp_overrides,
            compression=self.compression,
            record_timeline=self.record_timeline,
        )
        if dims.pp > 1:
            self.net.pipeline.overlap = self.overlap
            # this rank's layers under their paths in the unsplit network: state-dict and checkpoint keys unchanged
            local = [(names[int(i)], layer) for i, layer in self.net.named_layers() if not is_glue(names[int(i)])]
            local += [pair for i, _ in self.net.named_layers() for pair in (holders[int(i)] if holders else [])]
            setattr(module, attr, LocalLayers(local))
            self._steps = PipelineSteps(self.net, module, attr)
        if dims.tp > 1:
            set_device_mesh(module, self.device_mesh)
        if self.global_rank == 0:
            log.info("%s\n%s", self.describe(), "\n".join(str(p) for p in [stage_plan, *self.tp_plans[:1]] if p is not None))

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self.accelerator.setup(trainer)
        if self.net is None:
            self._build(trainer)
        self.model = self.lightning_module
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            if self.pipeline is not None:
                self.pipeline.accumulate_grad_batches = max(1, trainer.accumulate_grad_batches)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if self.pipeline is not None:
            group = self.pipeline.group
            plugin = self.precision_plugin
            replace_norm_clipping(
                plugin, lambda optimizer, clip_val: clip_grad_norm_across(list(plugin.main_params(optimizer)), float(clip_val), group=group)
            )

    # ---- steps: the network runs as a module (pp == 1) or through the pipeline (PipelineSteps) ------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._steps is None:
            return super().training_step(*args, **kwargs)
        return self._steps.train(self.lightning_module.training_step, self.precision_plugin.train_step_context, *args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._steps is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # the schedule already ran the backward of every micro-batch: only the hooks remain
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self._steps.add_gradients()
        return self.precision_plugin.post_backward(closure_loss, module)

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        pass  # no DDP wrapper to prepare

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self._steps is None and self.net is not None and self.net.grad_sync is not None:
            self.net.grad_sync()

    def _eval_step(self, hook: str, context, *args: Any, **kwargs: Any) -> Any:
        if self._steps is None:
            return getattr(super(), hook)(*args, **kwargs)
        return self._steps.evaluate(getattr(self.lightning_module, hook), context, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # ---- Lightning checkpoint files (DCP directories: MeshStrategy) ---------------------------
    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """A Lightning checkpoint file of the whole model: each rank takes its own layers' tensors."""
        if self._loaded_distributed:
            return
        if self.parallel_dims is not None and self.parallel_dims.tp > 1:
            raise ValueError(
                f"{type(self).__name__} with tp={self.parallel_dims.tp} resumes from the distributed checkpoint "
                "directories it saves (trainer.save_checkpoint / ModelCheckpoint under a lightning_distnn strategy); "
                "this is a single-file Lightning checkpoint. Load its weights into an unsplit module "
                "(LightningModule.load_from_checkpoint) and start a new fit, or resume from a DCP directory."
            )
        module = self.lightning_module
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in own}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self._loaded_distributed:
            return
        if self.pipeline is None and self.parallel_dims.tp == 1:
            return super().load_optimizer_state_dict(checkpoint)
        raise ValueError(
            f"{type(self).__name__} resumes optimizer state from the distributed checkpoint directories it saves "
            "(trainer.save_checkpoint / ModelCheckpoint under this strategy); this is a single-file Lightning "
            "checkpoint, whose optimizer state is indexed for the unsplit model. Load only its weights "
            "(LightningModule.load_from_checkpoint) and start a new fit, or resume from a DCP directory."
        )

    # ---- observability -----------------------------------------------------------------------
    @override
    def describe(self) -> str:
        dims = self.dims
        parts = [str(dims)]
        if dims.pp > 1:
            partition = self.partition if isinstance(self.partition, str) else f"partition {self.partition}"
            count = self.microbatches if not self.auto_microbatches else f"auto->{self.microbatches or '?'}"
            parts.append(f"{self.schedule}, m={count}, {partition}")
            if self.stages_per_rank > 1:
                parts.append(f"{self.stages_per_rank} stages/rank")
        if dims.tp > 1:
            parts.append("user tp plan" if self.tp_overrides else "auto tp plan")
        if dims.dp > 1 and self.compression:
            parts.append(f"{self.compression} all-reduce")
        return f"{type(self).__name__}({', '.join(parts)})"

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends and receives per optimizer step, by kind (see
        :meth:`~lightning_distnn.parallel.parallelize.ParallelNet.comm_bytes_per_step`); zero before the first batch."""
        return self.net.comm_bytes_per_step() if self.net is not None else {"sent": 0, "received": 0}

    def summary_note(self) -> Optional[str]:
        """A sentence for the run summary: why ``microbatches="auto"`` chose its count, when the model says the
        pipeline cannot reach 0.8x data parallel's throughput at this size (else ``None``)."""
        if self.auto_choice is None or self.auto_choice["vs_data_parallel"] >= 0.8:
            return None
        return self.auto_choice["why"]

    def pipeline_bubble(self, structural: bool = False) -> Optional[dict[str, float]]:
        """Measured idle fraction of this rank in recent training steps, beside the theoretical one and
        its parts (``Pipeline.bubble``); ``None`` when the layout has no pipeline.

        ``structural=True`` adds ``structural``: the bubble the schedule has with the compute times this
        run measured and free communication (``Pipeline.structural_bubble``). It gathers every rank's
        timeline, so every rank must call it.
        """
        if self.pipeline is None:
            return None
        report = self.pipeline.bubble()
        if structural:
            report["structural"] = self.pipeline.structural_bubble(self.gather_timeline())
        return report

    def gather_timeline(self) -> list:
        """Task records of every rank for the recorded steps (a collective: all ranks call it)."""
        records = self.pipeline.timeline.records if self.pipeline is not None else []
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, records)
        return [r for part in parts for r in part]

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self.pipeline is not None:
            self.pipeline.flush()
        if self.gantt_path and self.pipeline is not None and self.record_timeline:
            records = self.gather_timeline()
            bubble = dict(self.pipeline_bubble(), structural=self.pipeline.structural_bubble(records))
            if self.global_rank == 0:
                from lightning_distnn.pipeline_viz import plot_timeline

                path = Path(self.gantt_path)
                if not path.is_absolute():
                    path = Path(self.lightning_module.trainer.default_root_dir) / path
                plot_timeline(
                    records,
                    str(path),
                    title=f"{self.schedule}, pp={self.parallel_dims.pp}, m={self.microbatches}",
                    bubble=bubble,
                )

    @override
    def teardown(self) -> None:
        failing = sys.exc_info()[1]  # Lightning tears down inside its except block when a step raised
        if self.net is not None:
            self.net.close()
        try:
            super().teardown()
        except RuntimeError as err:
            if failing is None:
                raise
            # Lightning moves the module to the CPU; a DTensor parameter that the failed step's traceback
            # still references cannot be swapped ("Couldn't swap Linear.weight"), which would hide the error
            log.warning("teardown after %s: %s (left as it is; the error above is the one to read)",
                        type(failing).__name__, str(err).splitlines()[0])
