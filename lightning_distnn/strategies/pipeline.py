"""PipelineStrategy: vertical model distribution, each rank a share of the layers (a preset of the hybrid).

``PipelineStrategy(...)`` is :class:`~lightning_distnn.strategies.hybrid.HybridStrategy` with
``tp=1``: the same code path, arguments named as a pipeline user expects them. Built on
``torch.distributed.pipelining`` (PipelineStage + the GPipe, 1F1B, interleaved 1F1B, looped BFS,
interleaved zero-bubble, ZB-V and DualPipeV schedules) through
:mod:`lightning_distnn.parallel.pipeline`.

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_pipeline")
    trainer = Trainer(devices=4, strategy=PipelineStrategy(schedule="interleaved_1f1b", microbatches=8,
                                                           stages_per_rank=2, partition="balanced"))
    distnn-train strategy=pipeline strategy.schedule=gpipe strategy.microbatches=4
    distnn-train strategy=pipeline strategy.microbatches=auto      # chosen from measured compute and p2p latency

After setup, ``module.net`` on each rank holds only that rank's layers (under their original
indices, so state-dict keys match the unsplit model). Checkpoints are torch.distributed.checkpoint
directories keyed by those names, optimizer state included: they resume under another layout
(another pp, a hybrid, data parallel, one process).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from lightning_distnn.strategies._common import Timeout
from lightning_distnn.strategies.hybrid import HybridStrategy


class PipelineStrategy(HybridStrategy):
    """Pipeline-parallel training over ``pp`` ranks (``dp`` replicas of the pipeline, default 1).

    Args:
        schedule: ``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``looped_bfs``, ``interleaved_zero_bubble``,
            ``zbv_zero_bubble`` or ``dualpipev`` (case-insensitive).
        microbatches: micro-batches per batch, or ``"auto"`` (measured at setup: see :class:`HybridStrategy`).
        stages_per_rank: stages each rank holds (looped schedules: default 2; V schedules: 2; gpipe/1f1b: 1).
        partition: ``"balanced"`` (profiled), ``"uniform"``, layer counts per stage such as ``[3, 5]``, or
            module names to cut before (split points of a traced network, e.g. ``["encoder.block3"]``).
        pp: pipeline degree; default (``None``): all processes not used by ``dp``.
        dp: data-parallel degree (each stage's gradients averaged over ``dp`` replicas).
        module_attr, record_timeline, gantt_path, timeout, overlap, **kwargs: as :class:`HybridStrategy`.
    """

    strategy_name = "distnn_pipeline"

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="lightning_distnn pipeline parallel: torch.distributed.pipelining schedules over the pp axis", override=True)

    def __init__(
        self,
        schedule: str = "1f1b",
        microbatches: Union[int, str] = 4,
        stages_per_rank: Optional[int] = None,
        partition: Union[str, Sequence[int], Sequence[str]] = "balanced",
        pp: Optional[int] = None,
        dp: int = 1,
        module_attr: Optional[str] = None,
        record_timeline: bool = True,
        gantt_path: Optional[str] = None,
        timeout: Timeout = None,
        overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dp=dp,
            pp=-1 if pp is None else pp,
            tp=1,
            schedule=schedule,
            microbatches=microbatches,
            stages_per_rank=stages_per_rank,
            partition=partition,
            module_attr=module_attr,
            record_timeline=record_timeline,
            gantt_path=gantt_path,
            timeout=timeout,
            overlap=overlap,
            **kwargs,
        )
