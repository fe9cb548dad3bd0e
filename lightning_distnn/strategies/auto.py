"""AutoStrategy (``distnn_auto``): the planner picks the layout at setup, the hybrid strategy trains it.

At setup, in the processes that will train (so cores shared by several processes are measured as
shared), :func:`lightning_distnn.planner.plan_layout` profiles the network on an example batch
taken from what Lightning will iterate, measures the links of the process group, predicts every
``dp x pp x tp`` layout with the seed's cost model (T = sum T_i, S = sum S_i) and ranks them. Rank 0
logs the top rows and the winner's terms; every rank then trains the winner with
:class:`~lightning_distnn.strategies.hybrid.HybridStrategy`'s own code (no separate path).

The batch size of the training loader is the **global** batch (what one process would use): with
``dp`` replicas each replica's loader is rebuilt with ``batch_size / dp``, so a run equals one
process with that batch, whatever layout is chosen, and equals the chosen layout set by hand
(``HybridStrategy(**kwargs)`` with per-replica batches of ``batch_size / dp``).

Usage::

    Trainer(accelerator="cpu", devices=4, strategy="distnn_auto")
    Trainer(devices=10, strategy=AutoStrategy(max_memory_per_rank=2e9))
    distnn-train strategy=auto trainer.devices=4
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_distnn.parallel.pipeline import resolve_stages_per_rank, schedule_name
from lightning_distnn.parallel.traced import network_of
from lightning_distnn.strategies._common import Timeout, rebuilt_loader, sequential_of
from lightning_distnn.strategies._example import ENTRY_POINTS, example_inputs
from lightning_distnn.strategies.hybrid import HybridStrategy

log = logging.getLogger(__name__)


class AutoStrategy(HybridStrategy):
    """Choose dp x pp x tp, schedule, micro-batches and partition with the planner, then train.

    Args:
        max_memory_per_rank: bytes; layouts predicted above it are never chosen.
        schedules: pipeline schedules to consider (default: the planner's: gpipe, 1f1b, interleaved_1f1b).
        compressions: data-parallel wire formats to consider (``"none"``, ``"fp16"``, ``"bf16"``).
        max_microbatches: most micro-batches per batch to consider.
        optimizer_states: optimizer tensors per parameter for the memory model (SGD with momentum 1, Adam
            2); default: counted on the optimizer the module's ``configure_optimizers`` returns.
        cache_dir: where profiles are cached (default: the planner's; ``None`` disables the cache).
        module_attr, record_timeline, timeout, **kwargs: as :class:`HybridStrategy`.
    """

    strategy_name = "distnn_auto"

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, override=True,
            description="lightning_distnn planner: profiles, predicts every layout, trains the fastest that fits",
        )

    def __init__(
        self,
        max_memory_per_rank: Optional[float] = None,
        schedules: Optional[Sequence[str]] = None,
        compressions: Sequence[str] = ("none",),
        max_microbatches: int = 16,
        optimizer_states: Optional[int] = None,
        cache_dir: Any = "default",
        module_attr: Optional[str] = None,
        record_timeline: bool = True,
        timeout: Timeout = None,
        **kwargs: Any,
    ) -> None:
        if max_memory_per_rank is not None and not (isinstance(max_memory_per_rank, (int, float)) and max_memory_per_rank > 0):
            raise ValueError(f"max_memory_per_rank={max_memory_per_rank!r} must be a positive number of bytes, e.g. 2e9.")
        if not isinstance(max_microbatches, int) or max_microbatches < 1:
            raise ValueError(f"max_microbatches={max_microbatches!r} must be a positive integer.")
        if optimizer_states is not None and not (isinstance(optimizer_states, int) and optimizer_states >= 0):
            raise ValueError(f"optimizer_states={optimizer_states!r} must be a count of tensors per parameter "
                             "(SGD 0, SGD with momentum 1, Adam 2), or None to count them on your optimizer.")
        super().__init__(dp=-1, pp=1, tp=1, module_attr=module_attr, record_timeline=record_timeline, timeout=timeout, **kwargs)
        self.max_memory_per_rank = max_memory_per_rank
        self.plan_options: dict[str, Any] = {"compressions": tuple(compressions), "max_microbatches": max_microbatches}
        if schedules is not None:
            self.plan_options["schedules"] = tuple(schedule_name(s) for s in schedules)
        self.cache_dir = cache_dir
        self.optimizer_states = optimizer_states
        self.plan = None
        self.global_batch: Optional[int] = None
        self.data_parallel_only: Optional[str] = None  # why the planner considered data-parallel layouts only

    @override
    def build_layout(self) -> None:
        pass  # the layout is planned in setup, once the data module is set up (it supplies the example batch)

    @override
    def setup(self, trainer) -> None:
        if self.parallel_dims is None:
            self._plan()
            super().build_layout()
        super().setup(trainer)

    def _plan(self) -> None:
        from lightning_distnn.planner import plan_layout
        from lightning_distnn.planner.plan import WholeNetwork, layer_chain

        module = self.lightning_module
        options = dict(self.plan_options)
        try:
            _, network = sequential_of(module, self.module_attr)
        except TypeError:  # not a chain: the planner profiles it as one layer, data-parallel layouts only
            _, network = network_of(module, self.module_attr)
        net = layer_chain(network)  # the layer sequence the planner profiles (a ResNet's blocks)
        self.data_parallel_only = net.note if isinstance(net, WholeNetwork) else None
        example = example_inputs(module.trainer, module)
        if example is None:
            raise ValueError(f"strategy='distnn_auto' plans on an example batch but found none: give {ENTRY_POINTS}.")
        self.global_batch = int(example.shape[0])
        if self.cache_dir != "default":
            options["cache_dir"] = self.cache_dir
        if self.optimizer_states is None:
            self.optimizer_states = self._count_optimizer_states(module)
        self.plan = plan_layout(
            net.to(self.root_device),
            example[:1].to(self.root_device),
            world_size=self.world_size,
            global_batch=self.global_batch,
            max_memory_per_rank=self.max_memory_per_rank,
            optimizer_states=self.optimizer_states,
            syncs=("allreduce",),  # what the hybrid runs on its dp axis
            **options,
        )
        layout = self.plan.best.layout
        self.dp, self.pp, self.tp = layout.dp, layout.pp, layout.tp
        self.compression = None if layout.compression == "none" else layout.compression
        if layout.pp > 1:
            self.schedule = schedule_name(layout.schedule)
            self.stages_per_rank = resolve_stages_per_rank(self.schedule, layout.stages_per_rank)
            self.microbatches = layout.microbatches
            self.partition = list(layout.partition)
        if self.global_rank == 0:
            log.warning("[distnn_auto] chose %s\n%s", self.plan.strategy(), self.plan.render(top=5))

    @staticmethod
    def _count_optimizer_states(module) -> int:
        """Tensors per parameter the module's optimizer keeps (the largest over its optimizers; 1 if unknown)."""
        from lightning_distnn.consolidate import configured_optimizers
        from lightning_distnn.planner.profile import optimizer_states_of

        try:
            optimizers = configured_optimizers(module)
            if not optimizers:
                raise TypeError("configure_optimizers returned no torch.optim.Optimizer")
            return max(optimizer_states_of(o) for o in optimizers)
        except Exception as err:  # noqa: BLE001 - a plan with the default beats no plan
            log.warning("[distnn_auto] could not count the optimizer's states per parameter (%s: %s); the memory "
                        "model assumes 1 (SGD with momentum): pass AutoStrategy(optimizer_states=N).",
                        type(err).__name__, err)
            return 1

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # the loader's batch is the global batch: each of the dp replicas reads batch_size / dp of it
        dp = self.parallel_dims.dp if self.parallel_dims is not None else 1
        if dp == 1 or not isinstance(dataloader, DataLoader) or dataloader.batch_sampler is None:
            return dataloader
        size = dataloader.batch_size
        if not size or size % dp:
            return dataloader
        return rebuilt_loader(dataloader, batch_size=size // dp, sampler=dataloader.sampler, drop_last=dataloader.drop_last)

    @override
    def describe(self) -> str:
        inner = super().describe()[len(type(self).__name__) + 1 : -1]
        return f"{type(self).__name__}(planned: {inner})" if self.plan is not None else f"{type(self).__name__}(not planned yet)"
