"""Data-parallel strategies: every rank a share of the samples, a whole replica of the model.

One class per way the replicas agree, over one base (:class:`DataParallelBase`: DDP wrapping
through Lightning's ``DDPStrategy``, the mesh's ``dp`` axis, byte counting and logging):

==========================  ========================  ===================================================
class                       registered names          how replicas agree
==========================  ========================  ===================================================
DataParallelStrategy        distnn_dp, distnn_dp_fp16, DDP's bucketed all-reduce (peer to peer), optionally
                            _bf16, _powersgd, _topk    compressed (a DDP comm hook, on CPU/gloo too)
ParameterServerStrategy     distnn_ps, distnn_ps_async workers push gradients, servers step and send the
                                                       parameters back (master/worker; sync or async, sharded)
LocalSGDStrategy            distnn_local_sgd           local steps, parameters averaged every ``period``
==========================  ========================  ===================================================

Each takes only its own arguments (plus ``timeout``, the compression knobs and Lightning's
``DDPStrategy`` keywords); an argument of another mode is refused with the class that uses it.
``DataParallelStrategy(sync="parameter_server", ...)`` and ``sync="local_sgd"`` still build the
matching class (Hydra configs and scripts written for the one-class API keep working).

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_dp")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DataParallelStrategy(compression="powersgd"))
    trainer = Trainer(accelerator="cpu", devices=3, strategy=ParameterServerStrategy(
        ps_mode="async", max_staleness=4, num_servers=1, colocated=False))
    distnn-train strategy=ps_async trainer.devices=2
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from typing_extensions import override

from lightning_distnn.parallel.accounting import CommCounter
from lightning_distnn.parallel.compression import CompressionConfig, register_compression_hook
from lightning_distnn.parallel.local_sgd import LocalSGDConfig, PeriodicAverager
from lightning_distnn.strategies._common import Timeout
from lightning_distnn.strategies.base import MeshStrategy

SYNC_MODES = ("allreduce", "parameter_server", "local_sgd")

#: arguments that belong to one sync mode only (refused by the others, naming the class that takes them)
MODE_ARGUMENTS = {
    "parameter_server": ("ps_mode", "max_staleness", "num_servers", "colocated"),
    "local_sgd": ("local_sgd_period", "local_sgd_warmup_steps"),
}
MODE_CLASS = {"allreduce": "DataParallelStrategy", "parameter_server": "ParameterServerStrategy", "local_sgd": "LocalSGDStrategy"}


def compression_config(
    compression: str = "none",
    *,
    powersgd_rank: Optional[int] = None,
    powersgd_start_iter: Optional[int] = None,
    powersgd_min_compression_rate: Optional[float] = None,
    topk_ratio: Optional[float] = None,
) -> CompressionConfig:
    """A :class:`CompressionConfig`; a knob of another compressor than the chosen one is refused."""
    name = str(compression or "none").lower()
    knobs = {"powersgd_rank": powersgd_rank, "powersgd_start_iter": powersgd_start_iter,
             "powersgd_min_compression_rate": powersgd_min_compression_rate}
    stray = [k for k, v in knobs.items() if v is not None and name != "powersgd"]
    stray += ["topk_ratio"] if topk_ratio is not None and name != "topk" else []
    if stray:
        raise ValueError(
            f"{', '.join(f'{k}={knobs.get(k, topk_ratio)!r}' for k in stray)} configure "
            f"{'PowerSGD' if stray[0].startswith('powersgd') else 'top-k'}, but compression={compression!r}: set "
            f"compression={'powersgd' if stray[0].startswith('powersgd') else 'topk'!r}, or remove the argument."
        )
    defaults = CompressionConfig()
    return CompressionConfig(
        name=name,
        rank=defaults.rank if powersgd_rank is None else powersgd_rank,
        start_iter=defaults.start_iter if powersgd_start_iter is None else powersgd_start_iter,
        min_compression_rate=defaults.min_compression_rate if powersgd_min_compression_rate is None else powersgd_min_compression_rate,
        topk_ratio=defaults.topk_ratio if topk_ratio is None else topk_ratio,
    )


class DataParallelBase(MeshStrategy):
    """What every data-parallel strategy shares: whole replicas over the ``dp`` axis, byte counting.

    Args:
        timeout: seconds (or a timedelta) any collective or parameter-server message may wait before
            the job ends with an error naming the silent rank.
        compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"powersgd"`` or ``"topk"``.
        powersgd_rank, powersgd_start_iter, powersgd_min_compression_rate, topk_ratio: compressor knobs
            (see :class:`~lightning_distnn.parallel.compression.CompressionConfig`), only with their compressor.
        **kwargs: passed to Lightning's ``DDPStrategy`` / torch's ``DistributedDataParallel``.
    """

    sync = "allreduce"

    def __init__(
        self,
        sync: Optional[str] = None,
        timeout: Timeout = None,
        *,
        compression: str = "none",
        powersgd_rank: Optional[int] = None,
        powersgd_start_iter: Optional[int] = None,
        powersgd_min_compression_rate: Optional[float] = None,
        topk_ratio: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        if sync is not None and str(sync).lower() != self.sync:
            raise ValueError(
                f"{type(self).__name__} is sync={self.sync!r}, got sync={sync!r}: use {MODE_CLASS.get(str(sync).lower(), 'DataParallelStrategy')} "
                f"for it (valid sync modes: {', '.join(SYNC_MODES)})."
            )
        for mode, names in MODE_ARGUMENTS.items():
            given = [name for name in names if name in kwargs]
            if given and mode != self.sync:
                raise ValueError(
                    f"{', '.join(f'{n}={kwargs[n]!r}' for n in given)}: used only with sync={mode!r} "
                    f"({MODE_CLASS[mode]}), and this is {type(self).__name__} (sync={self.sync!r}). Remove "
                    f"{'it' if len(given) == 1 else 'them'}, or use {MODE_CLASS[mode]}."
                )
        self.compression = compression_config(
            compression,
            powersgd_rank=powersgd_rank,
            powersgd_start_iter=powersgd_start_iter,
            powersgd_min_compression_rate=powersgd_min_compression_rate,
            topk_ratio=topk_ratio,
        )
        super().__init__(timeout=timeout, **kwargs)
        self.comm_counter = CommCounter()

    @override
    def describe(self) -> str:
        parts = [self._describe_mode()] if self._describe_mode() else []
        if self.compression.name != "none":
            c = self.compression
            parts.append({"powersgd": f"powersgd r={c.rank}", "topk": f"top-k {c.topk_ratio:g}"}.get(c.name, c.name))
        parts.append(f"dp{self.dims.dp}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _describe_mode(self) -> str:
        return "all-reduce"

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        trainer = self.lightning_module.trainer
        # only on the steps Lightning writes logs: a per-step log would copy to the device every step
        if self.comm_counter.steps and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            stats = self.comm_counter.per_step()
            module = self.lightning_module
            module.log("comm/bytes_sent_per_step", float(stats["sent"]), on_step=True, on_epoch=False)
            module.log("comm/bytes_received_per_step", float(stats["received"]), on_step=True, on_epoch=False)
        return out

    def comm_bytes_per_step(self) -> dict[str, float]:
        """Bytes this rank sent and received per optimizer step so far (``sent``, ``received``,
        ``payload``, ``steps``); a co-located parameter server's traffic counts for its rank."""
        return self.comm_counter.per_step()


class DataParallelStrategy(DataParallelBase):
    """All-reduce data parallelism (DDP), registered as ``distnn_dp`` (and ``distnn_dp_<compression>``).

    ``compression="none"`` keeps DDP's built-in C++ all-reduce (no Python hook per bucket); the
    others register our comm hook (:mod:`lightning_distnn.parallel.compression`). See
    :class:`DataParallelBase` for the arguments.
    """

    strategy_name = "distnn_dp"

    def __new__(cls, sync: Optional[str] = None, *args: Any, **kwargs: Any):
        # the one-class API: DataParallelStrategy(sync="parameter_server" | "local_sgd", ...) builds that class
        name = "allreduce" if sync is None else str(sync).lower()
        if cls is DataParallelStrategy and name != "allreduce":
            from lightning_distnn.strategies.param_server import ParameterServerStrategy

            targets = {"parameter_server": ParameterServerStrategy, "local_sgd": LocalSGDStrategy}
            if name not in targets:
                raise ValueError(f"Unknown sync={sync!r}; valid sync modes: {', '.join(SYNC_MODES)}.")
            return targets[name](*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, sync: Optional[str] = None, timeout: Timeout = None, **kwargs: Any) -> None:
        super().__init__(sync, timeout, **kwargs)
        self._hook_state = None
        self._dense_grad_bytes = 0

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="lightning_distnn data parallel: DDP all-reduce", override=True)
        for name in ("fp16", "bf16", "powersgd", "topk"):
            strategy_registry.register(
                f"{cls.strategy_name}_{name}", cls, description=f"lightning_distnn data parallel: {name} all-reduce",
                override=True, compression=name,
            )

    @override
    def _register_ddp_hooks(self) -> None:
        if self._ddp_comm_hook is not None:  # a user-given hook: Lightning's own path
            return super()._register_ddp_hooks()
        if self.compression.name == "none":
            # plain all-reduce: DDP's built-in C++ path; the bytes of its one all-reduce of every gradient per
            # optimizer step are counted in optimizer_step
            self._dense_grad_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            return
        # Lightning registers comm hooks on CUDA only; ours work on CPU/gloo too
        self._hook_state = register_compression_hook(self.model, config=self.compression, counter=self.comm_counter)

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._dense_grad_bytes:
            self.comm_counter.allreduce(self._dense_grad_bytes, self.world_size)
        self.comm_counter.step()
        return out


class LocalSGDStrategy(DataParallelBase):
    """Local SGD (periodic model averaging), registered as ``distnn_local_sgd``.

    Gradients are all-reduced (compressed if asked) for ``local_sgd_warmup_steps``; after that each
    replica steps on its own gradients and the parameters are averaged every ``local_sgd_period`` steps.

    Args:
        local_sgd_period: optimizer steps between averages.
        local_sgd_warmup_steps: steps of per-step all-reduce first.
        timeout, compression, ...: see :class:`DataParallelBase`.
    """

    strategy_name = "distnn_local_sgd"
    sync = "local_sgd"

    def __init__(
        self,
        sync: Optional[str] = None,
        timeout: Timeout = None,
        *,
        local_sgd_period: int = 4,
        local_sgd_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        self.local_sgd = LocalSGDConfig(period=local_sgd_period, warmup_steps=local_sgd_warmup_steps)
        super().__init__(sync, timeout, **kwargs)
        self._hook_state = None
        self._averager: Optional[PeriodicAverager] = None

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="lightning_distnn data parallel with periodic model averaging (local SGD)",
            override=True,
        )

    @override
    def _describe_mode(self) -> str:
        return f"local SGD, period {self.local_sgd.period}, warm-up {self.local_sgd.warmup_steps}"

    @override
    def _register_ddp_hooks(self) -> None:
        self._hook_state = register_compression_hook(self.model, config=self.compression, counter=self.comm_counter)
        self._averager = PeriodicAverager(self.local_sgd, counter=self.comm_counter)
        self._hook_state.enabled = self._averager.in_warmup

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._averager.after_step(p for p in self.lightning_module.parameters() if p.requires_grad)
        self._hook_state.enabled = self._averager.in_warmup
        self.comm_counter.step()
        return out
