"""Tensor-parallel strategy: every rank a share of every Conv2d/Linear weight (horizontal model distribution).

Built on Lightning's ``ModelParallelStrategy`` (launcher, process group, broadcast/reduce), but
instead of asking the user for ``configure_model`` it shards the LightningModule's ``nn.Sequential``
with :func:`lightning_distnn.parallel.tensor.apply_tp`: our own Conv2d styles (local convolution on
the shard) and torch's Linear styles, from an automatic plan that a user plan overrides.
Degrees come from :class:`~lightning_distnn.mesh.ParallelDims`: ``tp`` ranks share the model,
``dp`` = the rest replicate it (gradients averaged over the ``dp`` axis, samplers split over it).

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_tp")
    trainer = Trainer(accelerator="cpu", devices=4, strategy=TensorParallelStrategy(tp=2))   # dp=2 x tp=2
    trainer = Trainer(..., strategy=TensorParallelStrategy(plan={"5.1": "replicate"}))

Checkpoints are torch.distributed.checkpoint directories (see :mod:`lightning_distnn.checkpoint`);
they reload at another ``tp`` or in one process.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_distnn.checkpoint import is_distributed_checkpoint, load_distributed, save_distributed
from lightning_distnn.parallel.collectives import flat_average_
from lightning_distnn.mesh import ParallelDims, device_type_of
from lightning_distnn.parallel.tensor import (
    REPLICATE,
    TPPlan,
    _leaves,
    apply_tp,
    comm_bytes,
    plan_tp,
)
from lightning_distnn.strategies._common import as_timedelta, sequential_of, world_size_of


class TensorParallelStrategy(ModelParallelStrategy):
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

    def __init__(
        self,
        tp: int = -1,
        plan: Optional[Mapping[str, str]] = None,
        module_attr: Optional[str] = None,
        timeout: Union[None, int, float, timedelta] = None,
        process_group_backend: Optional[str] = None,
    ) -> None:
        if not isinstance(tp, int) or (tp < 1 and tp != -1):
            raise ValueError(f"tp={tp!r} must be a positive integer, or -1 for all processes.")
        if plan is not None and not isinstance(plan, Mapping):
            raise TypeError(
                f"plan must map module names to style names, got {type(plan).__name__}: e.g. plan={{'0.0': 'colwise'}}."
            )
        super().__init__(
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=as_timedelta(timeout),
        )
        self.tp = tp
        self.plan = dict(plan) if plan is not None else None
        self.module_attr = module_attr
        self.parallel_dims: Optional[ParallelDims] = None
        self.tp_plan: Optional[TPPlan] = None
        self._activation_numel: dict[str, tuple[int, int]] = {}
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- layout
    def _dims(self, world_size: int) -> ParallelDims:
        if self.tp != -1 and world_size % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide the {world_size} processes (devices x num_nodes): set tp to a divisor "
                f"of {world_size}, or Trainer(devices=...) to a multiple of {self.tp}."
            )
        tp = world_size if self.tp == -1 else self.tp
        return ParallelDims(dp=-1, pp=1, tp=tp, world_size=world_size)

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process, before any child exists: validate the layout here
        self._dims(world_size_of(self))
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        self.parallel_dims = self._dims(self.world_size)
        self._device_mesh = self.parallel_dims.build_mesh(device_type_of(self.root_device))
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def tp_mesh(self):
        return self.device_mesh["tp"]

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dims = self.parallel_dims
        return {"num_replicas": dims.dp, "rank": dims.coordinates(self.global_rank)["dp"]}

    # ---------------------------------------------------------------- model
    @override
    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        _, net = sequential_of(self.lightning_module, self.module_attr)
        if self.tp_plan is None or getattr(net, "_tp_plan", None) is None:
            self.model_to_device()
            self.tp_plan = apply_tp(net, self.tp_mesh, plan=self.plan)
            self._record_activation_sizes(net)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _record_activation_sizes(self, net) -> None:
        """Forward hooks that note the global activation sizes (for :meth:`comm_bytes_per_step`)."""
        tp = self.parallel_dims.tp
        by_name = {e.name: e for e in self.tp_plan.entries}

        def hook(name):
            def record(module, inputs, output):
                e = by_name[name]
                n_in = inputs[0].numel() * (1 if e.input == REPLICATE else tp)
                local_out = output.to_local() if isinstance(output, DTensor) else output
                n_out = local_out.numel() * (1 if e.output == REPLICATE else tp)
                if module.training:
                    self._activation_numel[name] = (n_in, n_out)
            return record

        for name, module in _leaves(net):
            if name in by_name and by_name[name].style in ("colwise", "rowwise"):
                self._hooks.append(module.register_forward_hook(hook(name)))

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average gradients over the data-parallel axis (one flat all-reduce); nothing to do at dp=1."""
        dims = self.parallel_dims
        if dims is None or dims.dp == 1:
            return
        grads = [p.grad for p in self.lightning_module.parameters() if p.grad is not None]
        flat_average_(grads, group=self.device_mesh.get_group("dp"))

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends and receives per optimizer step (analytic, from the last training batch's shapes).

        Tensor-parallel collectives are counted as ring algorithms on the ``tp`` group (see
        :func:`lightning_distnn.parallel.tensor.comm_bytes`); at ``dp>1`` the flat gradient all-reduce
        (``2 (dp-1)/dp`` x the local gradient bytes) is added. Zero before the first training batch.
        """
        if self.tp_plan is None or not self._activation_numel:
            return {"sent": 0, "received": 0}
        out = comm_bytes(self.tp_plan, self._activation_numel)
        dp = self.parallel_dims.dp
        if dp > 1:
            local = sum(
                (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in self.lightning_module.parameters()
                if p.requires_grad
            )
            extra = int(round(2 * (dp - 1) / dp * local))
            out = {"sent": out["sent"] + extra, "received": out["received"] + extra}
        return out

    # ---------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write a DCP directory at ``filepath`` (shards of every rank + ``meta.pt`` with Lightning's state)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options (it writes DCP).")
        path = Path(self.broadcast(str(filepath)))
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        save_distributed(path, self.lightning_module, optimizers, extra=checkpoint)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read a DCP directory written at any layout into this one; returns Lightning's state."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_distributed_checkpoint(path):
            raise FileNotFoundError(
                f"{path} is not a distributed checkpoint directory: {type(self).__name__} writes and reads DCP "
                "directories (lightning_distnn.checkpoint). Pass the directory the strategy saved."
            )
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        return load_distributed(path, self.lightning_module, optimizers, strict=self.lightning_module.strict_loading)

    @override
    def teardown(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        super().teardown()



def describe_plan(module, tp: int, plan: Optional[Mapping[str, str]] = None, module_attr: Optional[str] = None) -> str:
    """The plan table :class:`TensorParallelStrategy` would use for a LightningModule, without processes."""
    _, net = sequential_of(module, module_attr)
    return str(plan_tp(net, tp, plan=plan))
