"""The one base of every lightning_distnn strategy: a layout, its mesh, timeouts and checkpoints.

:class:`MeshStrategy` is Lightning's ``DDPStrategy`` (launchers, cluster environments, torchrun,
SLURM, process group) plus the things every strategy of ours shares, each in one place:

* **the layout is decided** in :meth:`MeshStrategy.layout` (a :class:`~lightning_distnn.mesh.ParallelDims`
  from the strategy's arguments). It is validated once in the launching process, before any
  child exists (:meth:`_configure_launcher`), and built once per process in
  :meth:`setup_environment`, where every process group of every mesh axis gets the strategy's
  ``timeout``;
* **the model is checked** against what the strategy needs (:meth:`check_model`) in the
  launching process and again on every rank (torchrun/SLURM start the ranks themselves); a module
  that builds its layers in Lightning's ``configure_model`` hook is checked on every rank right
  after that hook;
* samplers split the samples over the mesh's ``dp`` axis (:attr:`distributed_sampler_kwargs`);
* **checkpoints are written and read** here: torch.distributed.checkpoint directories keyed by the
  unsplit model's parameter names (:mod:`lightning_distnn.checkpoint`), so a run saved under one
  layout resumes under any other; a regular Lightning checkpoint file still loads;
* :meth:`describe` names the layout in words (the run summary prints it).

Subclasses: the data-parallel strategies (:mod:`.data_parallel`, DDP-wrapped replicas), the
model-parallel :class:`~lightning_distnn.strategies.hybrid.HybridStrategy` and its presets, and the
feature-parallel strategy.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generator, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_distnn._compat import check_model_before_launch, patient_launcher, strategy_timeout, unwrap_optimizers
from lightning_distnn.faults.monitor import attach_fault_monitor, check_fault_monitor
from lightning_distnn.checkpoint import is_distributed_checkpoint, load_distributed, save_distributed
from lightning_distnn.mesh import Axis, ParallelDims, device_type_of
from lightning_distnn.strategies._common import Timeout, as_timedelta, world_size_of


class MeshStrategy(DDPStrategy):
    """Base class: one :class:`ParallelDims` layout per run, one DeviceMesh per process, DCP checkpoints.

    Args:
        timeout: seconds (or a ``timedelta``) any collective on any group may wait before the job
            ends with an error; default: env ``DISTNN_TIMEOUT_S`` or 300 s.
        fault_monitor: ``True``: a dead or hung rank ends the job with one message naming it and
            ``trainer.fit`` raises ``RankFailedError`` (a ``FaultMonitor(on_failure="raise")``, docs/faults.md);
            or a ``FaultMonitor(...)``; default ``False`` (add one to ``callbacks`` yourself, as ``distnn-train`` does).
        **kwargs: passed to Lightning's ``DDPStrategy`` (``process_group_backend``, ``start_method``, ...).
    """

    strategy_name = "distnn_mesh"

    def __init__(self, *, timeout: Timeout = None, fault_monitor: Any = False, **kwargs: Any) -> None:
        check_fault_monitor(fault_monitor)
        super().__init__(timeout=as_timedelta(timeout), **kwargs)
        self.fault_monitor = fault_monitor
        self.parallel_dims: Optional[ParallelDims] = None
        self._loaded_distributed = False

    # ---- the layout -------------------------------------------------------------------------
    def layout(self, world_size: int) -> ParallelDims:
        """The parallel degrees for ``world_size`` processes (a ``ValueError`` naming the fix if none fit)."""
        return ParallelDims(dp=-1, world_size=world_size)

    def check_layout(self, dims: ParallelDims) -> None:
        """Further checks of a layout against the strategy's arguments (no processes needed)."""

    def check_model(self, model: pl.LightningModule) -> None:
        """Raise if ``model`` cannot run under this strategy (no collective involved)."""

    def _planned_layout(self) -> ParallelDims:
        dims = self.layout(world_size_of(self))
        self.check_layout(dims)
        return dims

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process, before any child exists: validate the layout and the model here
        self._planned_layout()
        super()._configure_launcher()
        self._launcher = patient_launcher(self._launcher)  # its observer lets rank 0 name a dead rank first
        check_model_before_launch(self._launcher, self._check_model_if_built)

    def _check_model_if_built(self, model: pl.LightningModule) -> None:
        """:meth:`check_model` now, or, for a module that builds its layers in Lightning's ``configure_model``
        hook, right after that hook has run on each rank (:meth:`model_sharded_context`)."""
        if not is_overridden("configure_model", model):
            self.check_model(model)

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Lightning runs the module's configure_model() inside this context, on every rank, before setup
        with super().model_sharded_context():
            yield
        model = self.lightning_module
        if model is not None and is_overridden("configure_model", model):
            self.check_model(model)

    @override
    def connect(self, model: pl.LightningModule) -> None:
        self._check_model_if_built(model)
        super().connect(model)
        if self.fault_monitor:
            attach_fault_monitor(model.trainer, self.fault_monitor)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.build_layout()

    def build_layout(self) -> None:
        """Build this run's layout and its mesh (once per process; ``setup_environment`` calls it)."""
        self.parallel_dims = self.layout(self.world_size)
        self.check_layout(self.parallel_dims)
        self.parallel_dims.build_mesh(device_type_of(self.root_device), timeout=strategy_timeout(self))

    @property
    def device_mesh(self):
        """The ``("dp", "pp", "tp")`` DeviceMesh of this run (after ``setup_environment``)."""
        return self.parallel_dims.mesh

    @property
    def dims(self) -> ParallelDims:
        """The layout: after setup the one built for this run, before it the one planned from the arguments."""
        return self.parallel_dims if self.parallel_dims is not None else self._planned_layout()

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # ranks of one data-parallel replica read the same samples; replicas split them
        dims = self.dims
        return {"num_replicas": dims.dp, "rank": dims.rank_on(Axis.DP, self.global_rank)}

    def describe(self) -> str:
        """The layout in words, e.g. ``"DataParallelStrategy(all-reduce), dp2"``."""
        return f"{type(self).__name__}, {self.dims}"

    # ---- checkpoints: DCP directories (lightning_distnn.checkpoint) --------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # the module is split/sharded and the optimizers exist only after setup: DCP reads into those
        return True

    def _raw_optimizers(self) -> list:
        return unwrap_optimizers(self.optimizers)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write a DCP directory at ``filepath``: every rank's shards + Lightning's state in ``meta.pt``."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint writes DCP directories and takes no storage_options.")
        path = Path(self.broadcast(str(filepath)))
        extra = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        save_distributed(path, self.lightning_module, self._raw_optimizers(), extra=extra, layout=self.describe())

    @override
    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read a DCP directory written under any layout into this one; a Lightning file loads as usual."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_distributed_checkpoint(path):
            self._loaded_distributed = False
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._loaded_distributed = True
        checkpoint = load_distributed(
            path, self.lightning_module, self._raw_optimizers(), strict=self.lightning_module.strict_loading
        )
        # already restored into the module and optimizers; the keys tell Lightning they were in the checkpoint
        checkpoint.setdefault("optimizer_states", [{} for _ in self.optimizers])
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if not self._loaded_distributed:  # a DCP directory was already read into the module
            super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not self._loaded_distributed:
            super().load_optimizer_state_dict(checkpoint)
