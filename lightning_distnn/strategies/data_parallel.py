"""Data-parallel strategy: every rank a share of the samples, gradients all-reduced peer to peer.

Built on Lightning's ``DDPStrategy`` (so launchers, cluster environments, torchrun and SLURM work
as usual) and on torch's ``DistributedDataParallel``. The data-parallel group and the sampler's
rank come from :class:`~lightning_distnn.mesh.ParallelDims`.

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_dp")
    trainer = Trainer(accelerator="gpu", devices=8, num_nodes=2, strategy=DataParallelStrategy())

``sync`` selects how replicas are kept consistent; ``"allreduce"`` is DDP's bucketed all-reduce.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional, Union

from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_distnn.mesh import ParallelDims, device_type_of
from lightning_distnn.strategies._common import as_timedelta, world_size_of

SYNC_MODES = ("allreduce",)


class DataParallelStrategy(DDPStrategy):
    """Horizontal data distribution over ``devices x num_nodes`` processes (gloo on CPU, NCCL on GPU).

    Args:
        sync: how replicas agree; ``"allreduce"`` (default).
        timeout: seconds (or a timedelta) any collective may wait before the job ends with an error.
        **kwargs: passed to Lightning's ``DDPStrategy`` / torch's ``DistributedDataParallel``
            (e.g. ``bucket_cap_mb``, ``gradient_as_bucket_view``, ``start_method``).
    """

    strategy_name = "distnn_dp"

    def __init__(
        self,
        sync: str = "allreduce",
        timeout: Union[None, int, float, timedelta] = None,
        **kwargs: Any,
    ) -> None:
        sync = sync.lower()
        if sync not in SYNC_MODES:
            raise ValueError(f"Unknown sync={sync!r}; valid sync modes: {', '.join(SYNC_MODES)}.")
        super().__init__(timeout=as_timedelta(timeout), **kwargs)
        self.sync = sync
        self.parallel_dims: Optional[ParallelDims] = None

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process, before any child exists: validate the layout here
        ParallelDims(dp=-1, world_size=world_size_of(self))
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.parallel_dims = ParallelDims(dp=-1, world_size=self.world_size)
        self.parallel_dims.build_mesh(device_type_of(self.root_device))

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="lightning_distnn data parallel: DDP all-reduce over the data-parallel group",
            override=True,
        )
