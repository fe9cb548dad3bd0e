"""TensorParallelStrategy: every rank a share of every Conv2d/Linear weight (a preset of the hybrid).

``TensorParallelStrategy(...)`` is :class:`~lightning_distnn.strategies.hybrid.HybridStrategy` with
``pp=1``: the LightningModule's ``nn.Sequential`` is sharded by
:func:`lightning_distnn.parallel.tensor.apply_tp` (our own Conv2d styles running the local
convolution on the shard, torch's Linear styles, an automatic plan that a user plan overrides) and
runs as an ordinary module. ``tp`` ranks share the model; ``dp`` = the rest replicate it (gradients
averaged over the ``dp`` axis, samplers split over it).

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_tp")
    trainer = Trainer(accelerator="cpu", devices=4, strategy=TensorParallelStrategy(tp=2))   # dp=2 x tp=2
    trainer = Trainer(..., strategy=TensorParallelStrategy(plan={"5.1": "replicate"}))

On a small model on CPUs tensor parallelism is usually slower than data parallelism: it
all-reduces activations at every sharded pair of layers, every step, which costs more than the
compute it splits (``comm_bytes_per_step()["tp"]`` shows those bytes). It pays off when a layer's
weights or activations are too large for one device.

Checkpoints are torch.distributed.checkpoint directories; they reload at another ``tp`` or in one process.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from lightning_distnn.mesh import ParallelDims
from lightning_distnn.strategies._common import Timeout
from lightning_distnn.strategies.hybrid import HybridStrategy


class TensorParallelStrategy(HybridStrategy):
    """Shard the network's Conv2d and Linear layers over ``tp`` processes (gloo on CPU, NCCL on GPU).

    Args:
        tp: tensor-parallel degree; ``-1`` (default) = all processes. The data-parallel degree is the rest.
        plan: module name (relative to the network, e.g. ``"0.0"``) -> style name (``colwise``, ``rowwise``,
            ``replicate``, ``sharded_norm``, ``pass``); overrides the automatic plan for those modules.
        module_attr: the LightningModule attribute holding the ``nn.Sequential`` (default: its only one).
        timeout: seconds (or a timedelta) any collective may wait before the job ends with an error.
        process_group_backend: ``"gloo"`` / ``"nccl"`` (default: by device).
    """

    strategy_name = "distnn_tp"

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="lightning_distnn tensor parallel: Conv2d/Linear sharded over the tp axis (DTensor)", override=True)

    def __init__(
        self,
        tp: int = -1,
        plan: Optional[Mapping[str, str]] = None,
        module_attr: Optional[str] = None,
        timeout: Timeout = None,
        process_group_backend: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if plan is not None and not isinstance(plan, Mapping):
            raise TypeError(
                f"plan must map module names to style names, got {type(plan).__name__}: e.g. plan={{'0.0': 'colwise'}}."
            )
        super().__init__(
            dp=1 if tp == -1 else -1,
            pp=1,
            tp=tp,
            tp_plan=plan,
            module_attr=module_attr,
            timeout=timeout,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    @property
    def plan(self) -> Optional[dict]:
        """The user's plan (module name -> style), as given."""
        return self.tp_overrides

    @property
    def tp_plan(self):
        """The tensor-parallel plan in use (a :class:`~lightning_distnn.parallel.tensor.TPPlan`, after setup)."""
        return self.tp_plans[0] if self.tp_plans else None

    def layout(self, world_size: int) -> ParallelDims:
        if self.tp != -1 and world_size % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide the {world_size} processes (devices x num_nodes): set tp to a divisor "
                f"of {world_size}, or Trainer(devices=...) to a multiple of {self.tp}."
            )
        return super().layout(world_size)

    @property
    def tp_mesh(self):
        return self.device_mesh["tp"]
