"""ParameterServerStrategy: data parallelism through parameter servers on point-to-point messages.

Workers push gradients (optionally compressed), servers apply the optimizer to their shard of the
parameters and send the new values back (:mod:`lightning_distnn.parallel.param_server`):
master/worker synchronisation, synchronous (same weights as all-reduce) or asynchronous with
bounded staleness, sharded over ``num_servers`` servers that are co-located with workers or
dedicated ranks.

Usage::

    Trainer(accelerator="cpu", devices=2, strategy="distnn_ps")
    Trainer(accelerator="cpu", devices=3, strategy=ParameterServerStrategy(
        ps_mode="async", max_staleness=4, num_servers=1, colocated=False))
    distnn-train strategy=ps_async trainer.devices=2
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_distnn._compat import skip_per_batch_sigterm_broadcast, strategy_timeout, sync_module_states
from lightning_distnn.parallel.param_server import PS_MODES, ParameterServerGroup, plan_shards, split_roles
from lightning_distnn.strategies._common import Timeout
from lightning_distnn.strategies.data_parallel import DataParallelBase


class ParameterServerStrategy(DataParallelBase):
    """Parameter-server data parallelism on point-to-point messages, registered as ``distnn_ps`` /
    ``distnn_ps_async``.

    Args:
        ps_mode: ``"sync"`` (same weights as all-reduce) or ``"async"`` (bounded staleness).
        max_staleness: async only: how many steps a worker may run ahead of the slowest.
        num_servers: parameter-server shards (server ranks).
        colocated: servers are threads on ranks ``0..num_servers-1`` that also train (default), or
            dedicated processes (the last ``num_servers`` ranks, which do not train).
        timeout, compression, ...: see :class:`DataParallelBase` (compression applies to the pushes).
    """

    strategy_name = "distnn_ps"
    sync = "parameter_server"

    def __init__(
        self,
        sync: Optional[str] = None,
        timeout: Timeout = None,
        *,
        ps_mode: str = "sync",
        max_staleness: int = 0,
        num_servers: int = 1,
        colocated: bool = True,
        **kwargs: Any,
    ) -> None:
        if ps_mode not in PS_MODES:
            raise ValueError(f"Unknown ps_mode={ps_mode!r}; valid: {', '.join(PS_MODES)}.")
        if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness!r} must be an integer >= 0 (0 = lock-step).")
        if ps_mode == "sync" and max_staleness:
            raise ValueError(
                f"max_staleness={max_staleness} applies to ps_mode='async' only; ps_mode='sync' is lock-step. "
                "Set ps_mode='async' or remove max_staleness."
            )
        if not isinstance(num_servers, int) or isinstance(num_servers, bool) or num_servers < 1:
            raise ValueError(f"num_servers={num_servers!r} must be a positive integer.")
        super().__init__(sync, timeout, **kwargs)
        self.ps_mode, self.max_staleness = ps_mode, max_staleness
        self.num_servers, self.colocated = num_servers, bool(colocated)
        self._ps: Optional[ParameterServerGroup] = None
        self._server_steps = 0  # a dedicated server rank's optimizer steps in this fit

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="lightning_distnn data parallel through parameter servers (point-to-point)",
            override=True,
        )
        strategy_registry.register(
            f"{cls.strategy_name}_async", cls, description="lightning_distnn asynchronous parameter server (staleness 2)",
            override=True, ps_mode="async", max_staleness=2,
        )

    @override
    def _describe_mode(self) -> str:
        mode = "sync" if self.ps_mode == "sync" else f"async, staleness {self.max_staleness}"
        where = "co-located" if self.colocated else "dedicated"
        return f"parameter server, {mode}, {self.num_servers} {where} server{'s' if self.num_servers > 1 else ''}"

    def _roles(self, world_size: int) -> tuple[list[int], list[int]]:
        return split_roles(world_size, self.num_servers, self.colocated)

    @override
    def check_layout(self, dims) -> None:
        self._roles(dims.world_size)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        _, workers = self._roles(self.dims.world_size)
        rank = workers.index(self.global_rank) if self.global_rank in workers else 0
        return {"num_replicas": len(workers), "rank": rank}

    @override
    def configure_ddp(self) -> None:
        sync_module_states(self.model)  # every replica starts from rank 0's weights; no DDP wrapper

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
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
                f"the parameter server needs exactly one optimizer, configure_optimizers returned "
                f"{len(self.optimizers)}: the servers apply it to their shards."
            )
        plan = plan_shards(module.named_parameters(), servers=servers, workers=workers)
        self._server_steps = 0
        self._ps = ParameterServerGroup(
            module,
            plan,
            optimizer_factory=self._server_optimizer_factory(module, plan),
            compression=self.compression,
            mode=self.ps_mode,
            max_staleness=self.max_staleness,
            colocated=True,  # the server runs in a thread on dedicated ranks too (see training_step)
            counter=self.comm_counter,
            timeout=strategy_timeout(self).total_seconds(),
        )
        if self.ps_mode == "async":
            skip_per_batch_sigterm_broadcast(trainer)  # else Lightning's per-batch broadcast keeps workers in step

    def _server_optimizer_factory(self, module, plan) -> Callable:
        """The user's optimizer class and per-group hyper-parameters, rebuilt over a server's shard.

        The hyper-parameters follow the user's optimizer at every server step: an LR scheduler (or any
        code that changes ``param_groups``) steps the optimizer of this process, which Lightning's loop
        drives on every rank, dedicated server ranks included; the server copies its groups' values
        before applying an update. Async mode applies them as of this process's own step.
        """
        optimizer = self._raw_optimizers()[0]
        params = [p for p in module.parameters() if p.requires_grad]
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        indices = plan.indices(self.global_rank)

        def factory(server_params):
            groups: dict[int, list] = {}
            for i, sp in zip(indices, server_params):
                groups.setdefault(group_of.get(id(params[i]), 0), []).append(sp)
            sources = list(groups)
            server_optimizer = type(optimizer)(
                [dict({k: v for k, v in optimizer.param_groups[gi].items() if k != "params"}, params=ps) for gi, ps in groups.items()]
            )

            def follow_user_hyperparameters(server_opt, args, kwargs) -> None:
                for target, gi in zip(server_opt.param_groups, sources):
                    target.update({k: v for k, v in optimizer.param_groups[gi].items() if k != "params"})

            server_optimizer.register_step_pre_hook(follow_user_hyperparameters)
            return server_optimizer

        return factory

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self._ps is not None and not self._ps.is_worker:
            out = closure()  # a dedicated server rank: no gradients, nothing to push
            if self.ps_mode == "sync":  # stay at the step the server applies (its LR schedule is read here)
                self._server_steps += 1
                self._ps.wait_for_updates(self._server_steps)
        elif self._ps is not None:
            model = model or self.lightning_module
            out = self.precision_plugin.optimizer_step(_PushPull(optimizer, self._ps), model=model, closure=closure, **kwargs)
        else:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.comm_counter.step()
        return out

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._ps is not None and not self._ps.is_worker:
            # A dedicated server rank serves from a thread; its main thread walks Lightning's loop
            # without computing (a constant loss) so that Lightning's per-batch collectives (e.g.
            # the SIGTERM broadcast) still find every rank.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._ps is not None:
            # the servers copied the parameters when they were built, before a checkpoint was restored into
            # the module and the workers' optimizer: serve the restored values and momentum
            self._ps.import_state(self._raw_optimizers()[0])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if self._ps is not None:
            # the workers' optimizer never steps (the servers do): give it the servers' state, then save it
            self._ps.export_state(self._raw_optimizers()[0])
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def on_train_end(self) -> None:
        if self._ps is not None:
            self._ps.close()
        super().on_train_end()


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
