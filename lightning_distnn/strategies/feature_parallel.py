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

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_distnn._compat import optimizers_to_device
from lightning_distnn.mesh import Axis, ParallelDims
from lightning_distnn.parallel.feature import SplitNet, apply_feature_parallel, average_gradients
from lightning_distnn.partition.features import FeatureSliceDataset
from lightning_distnn.strategies._common import Timeout, rebuilt_loader, world_size_of
from lightning_distnn.strategies.base import MeshStrategy


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


class FeatureParallelStrategy(MeshStrategy):
    """Vertical data distribution over ``devices x num_nodes`` processes, one feature slice per process.

    Layout: the feature slices lie on the mesh's ``tp`` axis (every rank a share of the model's
    bottoms, like a tensor-parallel shard) and ``dp = 1`` (every rank reads every sample).
    Checkpoints are the DCP directories of :class:`~lightning_distnn.strategies.base.MeshStrategy`:
    each rank saves its own bottom, the replicated top once.

    Args:
        timeout: seconds (or a timedelta) any collective may wait before the job ends with an error.
        sync_top: average the top network's gradients over the ranks after each backward (the replicas
            see identical inputs, so this only guards against drift; one all-reduce of the top).
        slice_inputs: cut every loader's samples to the rank's slice, so each rank loads and moves only
            its features (otherwise the model cuts full samples).
        **kwargs: passed to Lightning's ``DDPStrategy`` (e.g. ``start_method``, ``process_group_backend``).
    """

    strategy_name = "distnn_feature"

    def __init__(self, timeout: Timeout = None, sync_top: bool = True, slice_inputs: bool = True, **kwargs: Any) -> None:
        super().__init__(timeout=timeout, **kwargs)
        self.sync_top = bool(sync_top)
        self.slice_inputs = bool(slice_inputs)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, override=True,
            description="lightning_distnn feature parallel: a bottom network per feature slice, all-gathered to a top",
        )

    @override
    def layout(self, world_size: int) -> ParallelDims:
        return ParallelDims(dp=1, pp=1, tp=world_size, world_size=world_size)

    @override
    def check_model(self, model: pl.LightningModule) -> None:
        """Raise if ``model`` cannot run feature-parallel on this many processes (no collective involved)."""
        net = split_net_of(model)
        processes = world_size_of(self)
        if net.plan.parts != processes:
            raise ValueError(
                f"the model splits the features into {net.plan.parts} slices ({net.plan.kind}) but the run has "
                f"{processes} processes (devices x num_nodes): one slice per process. Set Trainer(devices="
                f"{net.plan.parts}) or build the model with parts={processes} (distnn-train: trainer.devices="
                f"{net.plan.parts} or model.parts={processes})."
            )

    @override
    def describe(self) -> str:
        net = split_net_of(self.lightning_module) if self._lightning_module is not None else None
        kind = f"{net.plan.kind}, " if net is not None else ""
        return f"{type(self).__name__}({kind}{self.dims.tp} slices)"

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
            optimizers_to_device(self.optimizers, self.root_device)

    @override
    def _setup_model(self, model):
        group = self.parallel_dims.group(Axis.TP)
        apply_feature_parallel(split_net_of(model), rank=self.parallel_dims.rank_on(Axis.TP), world_size=self.world_size, group=group)
        return model

    @override
    def configure_ddp(self) -> None:
        self.model = self._setup_model(self.model)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        pass  # no DDP wrapper to prepare

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self.sync_top and self.world_size > 1:
            average_gradients(self.split_net.top.parameters(), group=self.parallel_dims.group(Axis.TP))

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
        # keeps the batch sampler (Lightning still calls its set_epoch)
        return rebuilt_loader(dataloader, FeatureSliceDataset(dataset, net.plan[net.rank]), batch_sampler=dataloader.batch_sampler)
