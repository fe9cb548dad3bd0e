"""Data-parallel strategies: every rank a share of the samples; replicas kept consistent by ``sync``.

Built on Lightning's ``DDPStrategy`` (so launchers, cluster environments, torchrun and SLURM work
as usual). The pure-torch pieces live in :mod:`lightning_distnn.parallel`:

==================  ==================  =====================================================
``sync``            registered name     how replicas agree
==================  ==================  =====================================================
allreduce           distnn_dp           DDP's bucketed all-reduce (peer to peer)
parameter_server    distnn_ps           workers push gradients, servers step and send back the
                                        parameters (master/worker; sync or async, sharded)
local_sgd           distnn_local_sgd    local steps, parameters averaged every ``period``
==================  ==================  =====================================================

``compression`` (none, fp16, bf16, powersgd, topk) applies to the all-reduce (a DDP comm hook,
registered on CPU/gloo too) and to the parameter server's pushes. Every mode counts the bytes it
sends: :meth:`DataParallelStrategy.comm_bytes_per_step`, logged as ``comm/bytes_*_per_step``.

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_dp")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DataParallelStrategy(compression="powersgd"))
    trainer = Trainer(accelerator="cpu", devices=3, strategy=DataParallelStrategy(
        sync="parameter_server", ps_mode="async", max_staleness=4, num_servers=1, colocated=False))
    distnn-train strategy=ps_async trainer.devices=2
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_distnn._compat import _sync_module_states, skip_per_batch_sigterm_broadcast
from lightning_distnn.mesh import ParallelDims, device_type_of
from lightning_distnn.parallel.accounting import CommCounter
from lightning_distnn.parallel.compression import CompressionConfig, register_compression_hook
from lightning_distnn.parallel.local_sgd import LocalSGDConfig, PeriodicAverager
from lightning_distnn.parallel.param_server import PS_MODES, ParameterServerGroup, plan_shards, split_roles
from lightning_distnn.strategies._checkpointing import DistributedCheckpointMixin
from lightning_distnn.strategies._common import as_timedelta, world_size_of

SYNC_MODES = ("allreduce", "parameter_server", "local_sgd")


class DataParallelStrategy(DistributedCheckpointMixin, DDPStrategy):
    """Horizontal data distribution over ``devices x num_nodes`` processes (gloo on CPU, NCCL on GPU).

    Args:
        sync: ``"allreduce"`` (default), ``"parameter_server"`` or ``"local_sgd"``.
        timeout: seconds (or a timedelta) any collective or parameter-server message may wait
            before the job ends with an error naming the silent rank.
        compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"powersgd"`` or ``"topk"``.
        powersgd_rank, powersgd_start_iter, powersgd_min_compression_rate, topk_ratio: compressor knobs
            (see :class:`~lightning_distnn.parallel.compression.CompressionConfig`).
        ps_mode: parameter server ``"sync"`` or ``"async"`` (bounded staleness).
        max_staleness: async only: how many steps a worker may run ahead of the slowest.
        num_servers: parameter-server shards (server ranks).
        colocated: servers are threads on ranks ``0..num_servers-1`` that also train (default), or
            dedicated processes (the last ``num_servers`` ranks, which do not train).
        local_sgd_period, local_sgd_warmup_steps: local SGD averaging period and all-reduce warm-up.
        **kwargs: passed to Lightning's ``DDPStrategy`` / torch's ``DistributedDataParallel``.
    """

    strategy_name = "distnn_dp"
    default_sync = "allreduce"

    def __init__(
        self,
        sync: Optional[str] = None,
        timeout: Union[None, int, float, timedelta] = None,
        *,
        compression: str = "none",
        powersgd_rank: int = 2,
        powersgd_start_iter: int = 10,
        powersgd_min_compression_rate: float = 2.0,
        topk_ratio: float = 0.01,
        ps_mode: str = "sync",
        max_staleness: int = 0,
        num_servers: int = 1,
        colocated: bool = True,
        local_sgd_period: int = 4,
        local_sgd_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        sync = (sync or self.default_sync).lower()
        if sync not in SYNC_MODES:
            raise ValueError(f"Unknown sync={sync!r}; valid sync modes: {', '.join(SYNC_MODES)}.")
        if ps_mode not in PS_MODES:
            raise ValueError(f"Unknown ps_mode={ps_mode!r}; valid: {', '.join(PS_MODES)} (used with sync='parameter_server').")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness!r} must be an integer >= 0 (0 = lock-step).")
        if not isinstance(num_servers, int) or num_servers < 1:
            raise ValueError(f"num_servers={num_servers!r} must be a positive integer.")
        self.compression = CompressionConfig(
            name=compression,
            rank=powersgd_rank,
            start_iter=powersgd_start_iter,
            min_compression_rate=powersgd_min_compression_rate,
            topk_ratio=topk_ratio,
        )
        self.local_sgd = LocalSGDConfig(period=local_sgd_period, warmup_steps=local_sgd_warmup_steps)
        super().__init__(timeout=as_timedelta(timeout), **kwargs)
        self.sync = sync
        self.ps_mode, self.max_staleness = ps_mode, max_staleness
        self.num_servers, self.colocated = num_servers, colocated
        self.parallel_dims: Optional[ParallelDims] = None
        self.comm_counter = CommCounter()
        self._hook_state = None
        self._dense_grad_bytes = 0
        self._averager: Optional[PeriodicAverager] = None
        self._ps: Optional[ParameterServerGroup] = None

    # -- layout --------------------------------------------------------------------------------
    def _roles(self, world_size: int) -> tuple[list[int], list[int]]:
        if self.sync != "parameter_server":
            return [], list(range(world_size))
        return split_roles(world_size, self.num_servers, self.colocated)

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process, before any child exists: validate the layout here
        world_size = world_size_of(self)
        ParallelDims(dp=-1, world_size=world_size)
        self._roles(world_size)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.parallel_dims = ParallelDims(dp=-1, world_size=self.world_size)
        self.parallel_dims.build_mesh(device_type_of(self.root_device))

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        world_size = self.num_nodes * self.num_processes
        _, workers = self._roles(world_size)
        rank = workers.index(self.global_rank) if self.global_rank in workers else 0
        return {"num_replicas": len(workers), "rank": rank}

    # -- wrapping ------------------------------------------------------------------------------
    @override
    def configure_ddp(self) -> None:
        if self.sync == "parameter_server":
            _sync_module_states(self.model)  # every replica starts from rank 0's weights; no DDP wrapper
            return
        super().configure_ddp()

    @override
    def _register_ddp_hooks(self) -> None:
        if self._ddp_comm_hook is not None:  # a user-given hook: Lightning's own path
            return super()._register_ddp_hooks()
        if self.sync == "allreduce" and self.compression.name == "none":
            # plain all-reduce: DDP's built-in C++ path, no Python hook per bucket; the bytes of its one
            # all-reduce of every gradient per optimizer step are counted in optimizer_step
            self._dense_grad_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            return
        # Lightning registers comm hooks on CUDA only; ours work on CPU/gloo too
        self._hook_state = register_compression_hook(self.model, config=self.compression, counter=self.comm_counter)
        if self.sync == "local_sgd":
            self._averager = PeriodicAverager(self.local_sgd, counter=self.comm_counter)
            self._hook_state.enabled = self._averager.in_warmup

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if self.sync == "parameter_server" and trainer.state.fn == TrainerFn.FITTING:
            self._setup_parameter_server(trainer)

    def _setup_parameter_server(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        servers, workers = self._roles(self.world_size)
        if not self.colocated and trainer.limit_val_batches != 0 and is_overridden("validation_step", module):
            raise ValueError(
                "Dedicated parameter servers (colocated=False) hold only their shard of the newest weights, so "
                "validation during fit (averaged over all ranks) would mix in stale weights: set "
                "Trainer(limit_val_batches=0) and test after fit, or use colocated=True."
            )
        if len(self.optimizers) != 1:
            raise ValueError(
                f"sync='parameter_server' needs exactly one optimizer, configure_optimizers returned "
                f"{len(self.optimizers)}: the servers apply it to their shards."
            )
        plan = plan_shards(module.named_parameters(), servers=servers, workers=workers)
        self._ps = ParameterServerGroup(
            module,
            plan,
            optimizer_factory=self._server_optimizer_factory(module, plan),
            compression=self.compression,
            mode=self.ps_mode,
            max_staleness=self.max_staleness,
            colocated=True,  # the server runs in a thread on dedicated ranks too (see training_step)
            counter=self.comm_counter,
            timeout=self._timeout.total_seconds(),
        )
        if self.ps_mode == "async":
            skip_per_batch_sigterm_broadcast(trainer)  # else Lightning's per-batch broadcast keeps workers in step

    def _server_optimizer_factory(self, module, plan) -> Callable:
        """The user's optimizer class and per-group hyper-parameters, rebuilt over a server's shard."""
        optimizer = self.optimizers[0]
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        params = [p for p in module.parameters() if p.requires_grad]
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        indices = plan.indices(self.global_rank)

        def factory(server_params):
            groups: dict[int, list] = {}
            for i, sp in zip(indices, server_params):
                groups.setdefault(group_of.get(id(params[i]), 0), []).append(sp)
            return type(optimizer)(
                [dict({k: v for k, v in optimizer.param_groups[gi].items() if k != "params"}, params=ps) for gi, ps in groups.items()]
            )

        return factory

    # -- stepping ------------------------------------------------------------------------------
    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self._ps is not None and not self._ps.is_worker:
            return closure()  # a dedicated server rank: no gradients, nothing to push
        if self._ps is not None:
            model = model or self.lightning_module
            out = self.precision_plugin.optimizer_step(_PushPull(optimizer, self._ps), model=model, closure=closure, **kwargs)
        else:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
            if self._dense_grad_bytes:
                self.comm_counter.allreduce(self._dense_grad_bytes, self.world_size)
            if self._averager is not None:
                self._averager.after_step(p for p in self.lightning_module.parameters() if p.requires_grad)
                self._hook_state.enabled = self._averager.in_warmup
        self.comm_counter.step()
        return out

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._ps is not None and not self._ps.is_worker:
            # A dedicated server rank serves from a thread; its main thread walks Lightning's loop
            # without computing (a constant loss) so that Lightning's per-batch collectives (e.g.
            # the SIGTERM broadcast) still find every rank.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        out = super().training_step(*args, **kwargs)
        trainer = self.lightning_module.trainer
        # only on the steps Lightning writes logs: a per-step log would copy to the device every step
        if self.comm_counter.steps and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            stats = self.comm_counter.per_step()
            module = self.lightning_module
            module.log("comm/bytes_sent_per_step", stats["sent"], on_step=True, on_epoch=False)
            module.log("comm/bytes_received_per_step", stats["received"], on_step=True, on_epoch=False)
        return out

    @override
    def on_train_end(self) -> None:
        if self._ps is not None:
            self._ps.close()
        super().on_train_end()

    def comm_bytes_per_step(self) -> dict[str, float]:
        """Bytes this rank sent and received per optimizer step so far (``sent``, ``received``,
        ``payload``, ``steps``); a co-located parameter server's traffic counts for its rank."""
        return self.comm_counter.per_step()



class _PushPull:
    """Stands in for the optimizer under the parameter server: ``step`` runs the closure
    (forward, backward, Lightning's hooks and clipping), then pushes and pulls."""

    def __init__(self, optimizer, ps: ParameterServerGroup) -> None:
        self._optimizer = optimizer
        self._ps = ps

    def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        loss = closure() if closure is not None else None
        self._ps.push_pull()
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class ParameterServerStrategy(DataParallelStrategy):
    """``DataParallelStrategy(sync="parameter_server")``, registered as ``distnn_ps``."""

    strategy_name = "distnn_ps"
    default_sync = "parameter_server"


class LocalSGDStrategy(DataParallelStrategy):
    """``DataParallelStrategy(sync="local_sgd")``, registered as ``distnn_local_sgd``."""

    strategy_name = "distnn_local_sgd"
    default_sync = "local_sgd"
