"""Feature-parallel strategy (vertical data distribution, split learning): each rank a share of the features.

Every rank reads the same samples but only its slice of their features (an image strip, a channel
group, a column group), runs its own bottom network on it, and the bottom outputs are all-gathered
to the top network (replicated on every rank), which computes the loss. Backward sends each bottom
its slice of the gradient of the gathered features. See :mod:`lightning_distnn.parallel.feature`.

Usage (the model is a :class:`~lightning_distnn.models.SplitClassifier` with ``parts`` = processes)::

    model = SplitClassifier(feature_partition="strips_h", parts=2, sample_shape=(3, 32, 32))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="distnn_feature")
    trainer.fit(model, datamodule=DigitsDataModule())

    distnn-train strategy=feature model=split trainer.devices=2     # Hydra (model/split.yaml)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Union

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_distnn._compat import _optimizers_to_device
from lightning_distnn.parallel.feature import SplitNet, apply_feature_parallel, average_gradients
from lightning_distnn.partition.features import FeatureSliceDataset
from lightning_distnn.strategies._common import as_timedelta, world_size_of


def split_net_of(module: pl.LightningModule) -> SplitNet:
    """The :class:`SplitNet` of a LightningModule (its ``net`` attribute), or a TypeError saying what to do."""
    net = getattr(module, "net", None)
    if not isinstance(net, SplitNet):
        raise TypeError(
            f"{type(module).__name__}.net is {type(net).__name__}, not a SplitNet: the feature-parallel strategy needs "
            "bottom networks per feature slice and a top network. Use lightning_distnn.models.SplitClassifier "
            "(or put a SplitNet from lightning_distnn.parallel.feature.build_split_net in `self.net`)."
        )
    return net


_RANK_STATES = "feature_parallel_rank_states"


def _prefix_of(module, child) -> str:
    for name, sub in module.named_modules():
        if sub is child:
            return f"{name}." if name else ""
    raise ValueError("the SplitNet is not part of the LightningModule")


class FeatureParallelStrategy(DDPStrategy):
    """Vertical data distribution over ``devices x num_nodes`` processes, one feature slice per process.

    Args:
        timeout: seconds (or a timedelta) any collective may wait before the job ends with an error.
        sync_top: average the top network's gradients over the ranks after each backward (the replicas
            see identical inputs, so this only guards against drift; one all-reduce of the top).
        slice_inputs: cut every loader's samples to the rank's slice, so each rank loads and moves only
            its features (otherwise the model cuts full samples).
        **kwargs: passed to Lightning's ``DDPStrategy`` (e.g. ``start_method``, ``process_group_backend``).
    """

    strategy_name = "distnn_feature"

    def __init__(
        self,
        timeout: Union[None, int, float, timedelta] = None,
        sync_top: bool = True,
        slice_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(timeout=as_timedelta(timeout), **kwargs)
        self.sync_top = bool(sync_top)
        self.slice_inputs = bool(slice_inputs)

    def check_model(self, model: pl.LightningModule) -> None:
        """Raise if ``model`` cannot run feature-parallel on this many processes (no collective involved)."""
        net = split_net_of(model)
        processes = world_size_of(self)
        if net.plan.parts != processes:
            raise ValueError(
                f"the model splits the features into {net.plan.parts} slices ({net.plan.kind}) but the run has "
                f"{processes} processes (devices x num_nodes): one slice per process. Set Trainer(devices="
                f"{net.plan.parts}) or build the model with parts={processes}."
            )

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        # check the model in the launching process, before any child exists (the launcher gets it first)
        launch = self._launcher.launch

        def checked_launch(function, *args, **kwargs):
            if args and isinstance(args[0], pl.LightningModule):
                self.check_model(args[0])
            return launch(function, *args, **kwargs)

        self._launcher.launch = checked_launch

    @override
    def connect(self, model: pl.LightningModule) -> None:
        self.check_model(model)  # again on every rank (torchrun / SLURM start the ranks themselves)
        super().connect(model)

    @property
    def split_net(self) -> SplitNet:
        return split_net_of(self.lightning_module)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup without DDP and without its rank-0 broadcast of the weights: the bottoms differ by rank
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.model = self._setup_model(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def _setup_model(self, model):
        apply_feature_parallel(split_net_of(model), rank=self.global_rank, world_size=self.world_size, group=None)
        return model

    @override
    def configure_ddp(self) -> None:
        self.model = self._setup_model(self.model)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank reads the same samples, in the same order: the split is by features
        return {"num_replicas": 1, "rank": 0}

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self.sync_top and dist.is_initialized() and self.world_size > 1:
            average_gradients(self.split_net.top.parameters())

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if not self.slice_inputs or not isinstance(dataloader, DataLoader):
            return dataloader
        dataset = dataloader.dataset
        if isinstance(dataset, (IterableDataset, FeatureSliceDataset)) or dataloader.batch_sampler is None:
            return dataloader
        net = self.split_net
        if net.rank is None:
            return dataloader
        options: dict[str, Any] = dict(
            batch_sampler=dataloader.batch_sampler,  # keeps the sampler (Lightning still calls its set_epoch)
            num_workers=dataloader.num_workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
            generator=dataloader.generator,
            persistent_workers=dataloader.persistent_workers,
        )
        if dataloader.num_workers > 0:
            options["prefetch_factor"] = dataloader.prefetch_factor
        return DataLoader(FeatureSliceDataset(dataset, net.plan[net.rank]), **options)

    # -- checkpoints: every rank's bottom (and optimizer state) goes into the one file rank 0 writes
    def _gather(self, obj: Any) -> list[Any]:
        if not (dist.is_initialized() and self.world_size > 1):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        net = self.split_net
        if net.rank is None:
            return state
        prefix = f"{_prefix_of(self.lightning_module, net)}bottoms."
        mine = {k: v.detach().cpu() for k, v in state.items() if k.startswith(f"{prefix}{net.rank}.")}
        for part in self._gather(mine):
            state.update(part)
        return state

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        net = self.split_net
        state = checkpoint["state_dict"]
        if net.rank is not None:
            prefix = f"{_prefix_of(self.lightning_module, net)}bottoms."
            state = {
                k: v for k, v in state.items() if not k.startswith(prefix) or k.startswith(f"{prefix}{net.rank}.")
            }
        self.lightning_module.load_state_dict(state, strict=strict)

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        # ranks optimise different bottoms: keep every rank's state, each rank loads its own
        return {_RANK_STATES: self._gather(optimizer.state_dict())}

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        states = [
            s[_RANK_STATES][self.global_rank] if isinstance(s, dict) and _RANK_STATES in s else s
            for s in checkpoint["optimizer_states"]
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

