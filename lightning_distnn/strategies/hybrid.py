"""Hybrid strategy: data x pipeline x tensor parallelism on one DeviceMesh.

A composition, not a copy: the pipeline pieces (:mod:`lightning_distnn.parallel.pipeline`, through
:class:`~lightning_distnn.strategies.pipeline.PipelineStrategy`) split the network's layers over the
``pp`` axis, the tensor-parallel pieces (:func:`lightning_distnn.parallel.tensor.apply_tp`) shard
every stage's Conv2d/Linear layers over the ``tp`` axis, and each stage's gradients are averaged
over the ``dp`` axis. Samplers split the samples over the ``dp`` axis only.

Mesh: ``ParallelDims(dp, pp, tp)`` with ``tp`` innermost, so rank ``r`` sits at
``dp = r // (pp*tp)``, ``pp = (r // tp) % pp``, ``tp = r % tp``.

Usage::

    Trainer(devices=4, strategy=HybridStrategy(dp=2, pp=2))                # dp2 x pp2
    Trainer(devices=4, strategy=HybridStrategy(dp=2, tp=2))                # dp2 x tp2
    Trainer(devices=10, strategy=HybridStrategy(dp=2, pp=5, microbatches=8))   # the seed's 2 x 5
    distnn-train strategy=hybrid strategy.pp=5 trainer.devices=10

What applies on the data-parallel axis: plain all-reduce (``sync="allreduce"``) with optional
``compression="fp16"``/``"bf16"`` (the flat gradient buffer is all-reduced in half precision).
The parameter server, local SGD, PowerSGD and top-k need either a whole model replica per worker
or DDP's gradient buckets; a hybrid replica is itself split over ``pp x tp`` ranks, so they are
refused with an error that says so (use ``DataParallelStrategy`` for them).

Checkpoints are torch.distributed.checkpoint directories keyed by the unsplit model's parameter
names (:mod:`lightning_distnn.checkpoint`): they resume under another layout, e.g. hybrid ->
``DataParallelStrategy``, or pipeline -> one process.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping, Optional, Sequence, Union

from typing_extensions import override

from lightning_distnn.mesh import ParallelDims
from lightning_distnn.parallel.tensor import apply_tp
from lightning_distnn.strategies.pipeline import PipelineStrategy

HYBRID_COMPRESSION = (None, "none", "fp16", "bf16")
NOT_ON_HYBRID = {
    "parameter_server": "a parameter server needs whole-model replicas on the workers",
    "local_sgd": "local SGD averages whole-model replicas",
    "powersgd": "PowerSGD runs as a DDP communication hook on gradient buckets, which the hybrid does not use",
    "topk": "top-k runs as a DDP communication hook on gradient buckets, which the hybrid does not use",
}


class HybridStrategy(PipelineStrategy):
    """dp x pp x tp training of an ``nn.Sequential`` LightningModule (the model-parallel contract).

    Args:
        dp, pp, tp: parallel degrees; one of them may be ``-1`` ("the rest", default ``dp``).
            ``pp=1`` runs the network as one stage (dp x tp), ``tp=1`` is dp x pp.
        schedule, microbatches, stages_per_rank, partition: the pipeline's (see
            :class:`PipelineStrategy`); with ``pp=1`` the default schedule is GPipe with one micro-batch.
        tp_plan: module name -> style for the tensor-parallel plan (names relative to the network,
            e.g. ``"5.1": "replicate"``); overrides the automatic plan.
        sync: ``"allreduce"`` (the only mode that composes with pp/tp; see the module docstring).
        compression: ``None``, ``"fp16"`` or ``"bf16"`` for the data-parallel all-reduce.
        timeout: seconds any collective may wait before the job ends with an error.
    """

    strategy_name = "distnn_hybrid"

    def __init__(
        self,
        dp: int = -1,
        pp: int = 1,
        tp: int = 1,
        schedule: Optional[str] = None,
        microbatches: Optional[int] = None,
        stages_per_rank: Optional[int] = None,
        partition: Union[str, Sequence[int]] = "balanced",
        tp_plan: Optional[Mapping[str, str]] = None,
        sync: str = "allreduce",
        compression: Optional[str] = None,
        module_attr: Optional[str] = None,
        record_timeline: bool = True,
        gantt_path: Optional[str] = None,
        timeout: Union[None, int, float, timedelta] = None,
        **kwargs: Any,
    ) -> None:
        sync_name = str(sync).lower()
        if sync_name in NOT_ON_HYBRID or (compression or "none").lower() in NOT_ON_HYBRID:
            what = sync_name if sync_name in NOT_ON_HYBRID else str(compression).lower()
            raise ValueError(
                f"HybridStrategy cannot use {what!r} on its data-parallel axis: {NOT_ON_HYBRID[what]}, and each "
                "hybrid replica is split over pp x tp ranks. Use sync='allreduce' with compression None/'fp16'/'bf16', "
                "or DataParallelStrategy for this sync mode."
            )
        if sync_name != "allreduce":
            raise ValueError(f"Unknown sync={sync!r} for HybridStrategy; valid: 'allreduce'.")
        if compression is not None and str(compression).lower() not in HYBRID_COMPRESSION:
            raise ValueError(
                f"Unknown compression={compression!r} for HybridStrategy; valid: None, 'fp16', 'bf16'."
            )
        for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
            if not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(f"{name}={value!r} must be a positive integer, or -1 for 'the rest'.")
        single_stage = pp == 1
        super().__init__(
            schedule=schedule or ("gpipe" if single_stage else "1f1b"),
            microbatches=microbatches or (1 if single_stage else 4),
            stages_per_rank=stages_per_rank,
            partition="uniform" if single_stage and partition == "balanced" else partition,
            pp=pp,
            dp=dp,
            module_attr=module_attr,
            record_timeline=record_timeline and not single_stage,
            gantt_path=gantt_path,
            timeout=timeout,
            **kwargs,
        )
        self.tp = tp
        self.tp_plan = dict(tp_plan) if tp_plan is not None else None
        self.sync = sync_name
        self.compression = None if compression in (None, "none") else str(compression).lower()
        self.tp_plans: list = []

    @override
    def _dims(self, world_size: int) -> ParallelDims:
        return ParallelDims(dp=self.dp, pp=self.pp, tp=self.tp, world_size=world_size)

    @override
    def _stage_transform(self, mesh):
        """Shard each stage's layers over the ``tp`` axis (nothing to do at tp=1)."""
        if self.parallel_dims.tp == 1:
            return None
        tp_mesh = mesh["tp"]

        def shard(stage):
            self.tp_plans.append(apply_tp(stage, tp_mesh, plan=self.tp_plan))
            return stage

        return shard

    @override
    def setup(self, trainer) -> None:
        if self.parallel_dims.tp > 1 and trainer.gradient_clip_val:
            raise ValueError(
                f"gradient_clip_val={trainer.gradient_clip_val} with tp={self.parallel_dims.tp}: HybridStrategy clips "
                "by the norm across pipeline stages, which does not yet include tensor-parallel shards. Clip with "
                "tp=1 (dp x pp), or remove gradient_clip_val."
            )
        super().setup(trainer)

    @override
    def _build(self, trainer) -> None:
        super()._build(trainer)
        self.pipeline.grad_compression = self.compression

