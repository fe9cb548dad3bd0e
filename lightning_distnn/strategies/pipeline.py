"""Pipeline strategy: vertical model distribution, each rank a share of the layers.

Built on ``torch.distributed.pipelining`` (PipelineStage + the GPipe, 1F1B, interleaved 1F1B,
looped BFS, interleaved zero-bubble, ZB-V and DualPipeV schedules) through the pure functions of
:mod:`lightning_distnn.parallel.pipeline`, and on Lightning's ``DDPStrategy`` for launching,
process groups and cluster environments (no DDP wrapper is used).

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_pipeline")
    trainer = Trainer(devices=4, strategy=PipelineStrategy(schedule="interleaved_1f1b", microbatches=8,
                                                           stages_per_rank=2, partition="balanced"))
    distnn-train strategy=pipeline strategy.schedule=gpipe strategy.microbatches=4

What the LightningModule needs (the model-parallel contract of DESIGN.md): its network is an
``nn.Sequential`` attribute (``self.net``) and it defines ``loss_fn(outputs, targets)``; batches
are ``(inputs, targets)``; automatic optimisation. ``training_step`` is still called, with the
network's output replaced by the pipeline's: the schedule runs forward and backward of every
micro-batch, the last stage's output is broadcast to every pipeline rank, and the module's own
``training_step`` (logging, metrics) runs on that output, so what it logs reaches the logger and
the progress bar on every rank. Validation, test and predict run a forward-only pass the same way.

After setup, ``module.net`` on each rank holds only that rank's layers (under their original
indices, so state-dict keys match the unsplit model). Checkpoints are torch.distributed.checkpoint
directories keyed by those names, optimizer state included (:mod:`lightning_distnn.checkpoint`):
they resume under another layout (another pp, a hybrid, data parallel, one process) and
``load_distributed`` reads one into an unsplit module.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_distnn.mesh import ParallelDims, device_type_of
from lightning_distnn.parallel.pipeline import (
    Pipeline,
    apply_pipeline,
    check_microbatches,
    clip_grad_norm_across,
    resolve_stages_per_rank,
    schedule_name,
)
from lightning_distnn.partition.model import PARTITION_METHODS, explicit, make_plan, profile_layer_costs
from lightning_distnn.strategies._checkpointing import DistributedCheckpointMixin
from lightning_distnn.strategies._common import as_timedelta, loss_fn_of, sequential_of, world_size_of

log = logging.getLogger(__name__)


class _LocalLayers(nn.Sequential):
    """This rank's layers of a split network, under their original indices (not callable)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "This network is split over pipeline stages by PipelineStrategy and holds only this rank's layers: run it "
            "through the Trainer (fit/validate/test/predict), or load a checkpoint (it has the full model) into an "
            "unsplit module."
        )


class _Replay(nn.Module):
    """Stands in for the network inside the user's step: returns the pipeline's output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


class PipelineStrategy(DistributedCheckpointMixin, DDPStrategy):
    """Pipeline-parallel training of an ``nn.Sequential`` LightningModule over ``pp`` ranks.

    Args:
        schedule: ``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``looped_bfs``,
            ``interleaved_zero_bubble``, ``zbv_zero_bubble`` or ``dualpipev`` (case-insensitive).
        microbatches: micro-batches per batch; the batch size must be a multiple of it.
        stages_per_rank: stages each rank holds (looped schedules: default 2; V schedules: 2;
            gpipe/1f1b: 1). The pipeline has ``pp x stages_per_rank`` stages.
        partition: ``"balanced"`` (profile every layer's forward+backward time on the device, then
            the contiguous split minimising the slowest stage), ``"uniform"``, or a list of layer
            counts per stage such as ``[3, 5]``.
        pp: pipeline degree; default: all processes not used by ``dp``.
        dp: data-parallel degree (each stage's gradients averaged over ``dp`` replicas).
        module_attr: name of the ``nn.Sequential`` attribute (default: the only one).
        record_timeline: time every F/B/I/W task (for the Gantt chart and the bubble).
        gantt_path: if set, rank 0 draws the last training step's schedule there (PNG) at the end of fit.
        timeout: seconds any collective may wait before the job ends with an error.
        **kwargs: passed to Lightning's ``DDPStrategy`` (e.g. ``process_group_backend``, ``start_method``).
    """

    strategy_name = "distnn_pipeline"

    def __init__(
        self,
        schedule: str = "1f1b",
        microbatches: int = 4,
        stages_per_rank: Optional[int] = None,
        partition: Union[str, Sequence[int]] = "balanced",
        pp: Optional[int] = None,
        dp: int = 1,
        module_attr: Optional[str] = None,
        record_timeline: bool = True,
        gantt_path: Optional[str] = None,
        timeout: Union[None, int, float, timedelta] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(timeout=as_timedelta(timeout), **kwargs)
        self.schedule = schedule_name(schedule)
        self.stages_per_rank = resolve_stages_per_rank(self.schedule, stages_per_rank)
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(f"microbatches={microbatches!r} must be a positive integer (micro-batches per batch).")
        self.microbatches = microbatches
        if isinstance(partition, str):
            if partition.lower() not in PARTITION_METHODS:
                raise ValueError(
                    f"Unknown partition={partition!r}; valid: {', '.join(PARTITION_METHODS)}, or a list of layer "
                    "counts per stage such as [3, 5]."
                )
            self.partition: Union[str, list[int]] = partition.lower()
        else:
            self.partition = list(partition)
            explicit(self.partition)  # validates the counts
        self.pp, self.dp = pp, dp
        self.module_attr = module_attr
        self.record_timeline = record_timeline
        self.gantt_path = gantt_path
        self.parallel_dims: Optional[ParallelDims] = None
        self.pipeline: Optional[Pipeline] = None
        self._module_attr_name: Optional[str] = None
        self._pending_grads: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- layout ---------------------------------------------------------------------------
    def _dims(self, world_size: int) -> ParallelDims:
        return ParallelDims(dp=self.dp, pp=-1 if self.pp is None else self.pp, tp=1, world_size=world_size)

    @property
    def num_stages(self) -> int:
        pp = self.parallel_dims.pp if self.parallel_dims is not None else self.pp
        return (pp or 1) * self.stages_per_rank

    def _check_layout(self, dims: ParallelDims) -> None:
        stages = dims.pp * self.stages_per_rank
        check_microbatches(
            self.microbatches, self.microbatches, schedule=self.schedule, pp_size=dims.pp, num_stages=stages
        )
        if isinstance(self.partition, list) and len(self.partition) != stages:
            raise ValueError(
                f"partition={self.partition} has {len(self.partition)} stages, but pp={dims.pp} x "
                f"stages_per_rank={self.stages_per_rank} makes {stages}: give one layer count per stage."
            )

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process, before any child exists: validate the layout here
        self._check_layout(self._dims(world_size_of(self)))
        super()._configure_launcher()

    @override
    def connect(self, model) -> None:
        # every process, before any step: check the module against the contract and the layout
        if not getattr(model, "automatic_optimization", True):
            raise ValueError(
                f"{type(model).__name__} uses manual optimisation; PipelineStrategy runs the backward inside the "
                "pipeline schedule and needs automatic_optimization=True."
            )
        if not any(isinstance(child, _LocalLayers) for child in model.children()):
            _, net = sequential_of(model, self.module_attr)
            loss_fn_of(model)
            dims = self._dims(world_size_of(self))
            self._check_layout(dims)
            stages = dims.pp * self.stages_per_rank
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
        super().connect(model)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.parallel_dims = self._dims(self.world_size)
        self.parallel_dims.build_mesh(device_type_of(self.root_device))

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # pipeline ranks of one replica read the same batches; replicas split the samples
        dims = self.parallel_dims or self._dims(self.num_nodes * self.num_processes)
        return {"num_replicas": dims.dp, "rank": dims.coordinates(self.global_rank)["dp"]}

    # ---- building the pipeline ------------------------------------------------------------
    def _example_input(self, trainer) -> Optional[torch.Tensor]:
        module = self.lightning_module
        example = getattr(module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            return example
        sources = [trainer.datamodule, module] if trainer.datamodule is not None else [module]
        hooks = ["train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"]
        for source in sources:
            for hook in hooks:
                try:
                    batch = next(iter(getattr(source, hook)()))
                except Exception:  # noqa: BLE001 - a hook that is missing or not set up
                    continue
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                if isinstance(x, torch.Tensor):
                    return x[: max(1, x.shape[0] // self.microbatches)]
        return None

    def _plan(self, trainer, net: nn.Sequential):
        stages = self.num_stages
        costs = None
        if self.partition == "balanced":
            example = self._example_input(trainer)
            if example is None:
                raise ValueError(
                    "partition='balanced' profiles each layer on an example micro-batch but found none: set "
                    "`self.example_input_array` in the LightningModule, give the Trainer a datamodule with a "
                    "train_dataloader, or use partition='uniform' or a list of layer counts."
                )
            box = [None]
            if self.global_rank == 0:
                box[0] = profile_layer_costs(net.to(self.root_device), example.to(self.root_device))
            dist.broadcast_object_list(box, src=0)  # one partition for all ranks
            costs = box[0]
        return make_plan(self.partition, len(net), stages, costs=costs)

    def _stage_transform(self, mesh):
        """A callable applied to each stage module before it is wrapped (subclasses shard it); None here."""
        return None

    def _build(self, trainer) -> None:
        module = self.lightning_module
        attr, net = sequential_of(module, self.module_attr)
        dims = self.parallel_dims
        plan = self._plan(trainer, net)
        mesh = dims.build_mesh(device_type_of(self.root_device))
        self.pipeline = apply_pipeline(
            net,
            plan,
            group=mesh.get_group("pp"),
            device=self.root_device,
            loss_fn=loss_fn_of(module),
            schedule=self.schedule,
            microbatches=self.microbatches,
            dp_group=mesh.get_group("dp") if dims.dp > 1 else None,
            stage_transform=self._stage_transform(mesh),
            record_timeline=self.record_timeline,
        )
        local = OrderedDict((name, layer) for m in self.pipeline.modules for name, layer in m.named_children())
        setattr(module, attr, _LocalLayers(local))
        self._module_attr_name = attr
        if self.global_rank == 0:
            log.info("pipeline plan (%s, %s):\n%s", self.schedule, plan.method, plan)

    @override
    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if self.pipeline is None or not isinstance(getattr(module, self._module_attr_name or "", None), _LocalLayers):
            self._build(trainer)
        self.model = module
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.pipeline.grad_divisor = float(self.microbatches * max(1, trainer.accumulate_grad_batches))
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._install_global_clipping()

    def _install_global_clipping(self) -> None:
        # norm clipping must use the norm of the whole model, not of this rank's stages
        plugin = self.precision_plugin
        group = self.pipeline.group

        def clip_grad_by_norm(optimizer, clip_val: Union[int, float]) -> None:
            params = [p for p in plugin.main_params(optimizer)]
            clip_grad_norm_across(params, float(clip_val), group=group)

        plugin.clip_grad_by_norm = clip_grad_by_norm

    # ---- steps ----------------------------------------------------------------------------
    def _split_batch(self, batch: Any, targets: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(batch, (list, tuple)) and len(batch) >= 2 and targets:
            return batch[0], batch[1]
        if isinstance(batch, (list, tuple)):
            return batch[0], None
        if isinstance(batch, torch.Tensor) and not targets:
            return batch, None
        raise TypeError(
            f"PipelineStrategy needs batches of (inputs, targets), got {type(batch).__name__}: return a tuple from "
            "the dataset (e.g. TensorDataset(x, y))."
        )

    @contextmanager
    def _replaying(self, output: torch.Tensor):
        module = self.lightning_module
        local = getattr(module, self._module_attr_name)
        module._modules[self._module_attr_name] = _Replay(output)
        try:
            yield
        finally:
            module._modules[self._module_attr_name] = local

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["batch"]
        x, y = self._split_batch(batch)
        # The schedule's backward runs here, but Lightning zeroes (or keeps, when accumulating) the
        # gradients between training_step and backward: set this batch's gradients aside and add
        # them in `backward`, leaving the earlier ones for Lightning to handle.
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self.precision_plugin.train_step_context():
            output = self.pipeline.train_step(x, y)
        self._pending_grads = [(p, p.grad) for p in params if p.grad is not None]
        for p, grad in zip(params, earlier):
            p.grad = grad
        output = self.pipeline.broadcast_output(output)
        with self._replaying(output), torch.no_grad():
            return self.lightning_module.training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the schedule already ran the backward of every micro-batch: only the hooks remain
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._pending_grads:
            p.grad = grad if p.grad is None else p.grad + grad
        self._pending_grads = []
        return self.precision_plugin.post_backward(closure_loss, module)

    def _eval_step(self, hook: str, context, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["batch"]
        x, _ = self._split_batch(batch, targets=False)
        with torch.inference_mode(False), torch.no_grad(), context():
            output = self.pipeline.forward(x.clone() if self.pipeline.is_first else None, int(x.shape[0]))
            output = self.pipeline.broadcast_output(output)
        with self._replaying(output):
            return getattr(self.lightning_module, hook)(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # ---- checkpoints (DCP directories: DistributedCheckpointMixin) ---------------------------
    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """A Lightning checkpoint file of the whole model: each rank takes its own layers' tensors."""
        if self._loaded_distributed:  # a DCP directory: already read into the stages
            return
        module = self.lightning_module
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in own}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self._loaded_distributed:
            return
        raise ValueError(
            "PipelineStrategy resumes optimizer state from the distributed checkpoint directories it saves "
            "(trainer.save_checkpoint / ModelCheckpoint under this strategy); this is a single-file Lightning "
            "checkpoint, whose optimizer state is indexed for the unsplit model. Load only its weights "
            "(LightningModule.load_from_checkpoint) and start a new fit, or resume from a DCP directory."
        )

    # ---- observability --------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends/receives between pipeline stages per optimizer step (activation shapes x micro-batches)."""
        if self.pipeline is None:
            return {"sent": 0, "received": 0}
        return self.pipeline.comm_bytes_per_step(training=True)

    def pipeline_bubble(self) -> dict[str, float]:
        """Measured idle fraction of this rank in recent training steps, beside the theoretical one."""
        if self.pipeline is None:
            return {"measured": math.nan, "theory": math.nan}
        return self.pipeline.bubble()

    def gather_timeline(self) -> list:
        """Task records of every rank for the recorded steps (a collective: all ranks call it)."""
        records = self.pipeline.timeline.records if self.pipeline is not None else []
        out: list = []
        for part in self._gather(records):
            out.extend(part)
        return out

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self.gantt_path and self.pipeline is not None and self.record_timeline:
            records = self.gather_timeline()
            if self.global_rank == 0:
                from lightning_distnn.pipeline_viz import plot_timeline

                plot_timeline(
                    records,
                    self.gantt_path,
                    title=f"{self.schedule}, pp={self.parallel_dims.pp}, m={self.microbatches}",
                    bubble=self.pipeline_bubble(),
                )

