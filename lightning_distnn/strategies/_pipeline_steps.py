"""Lightning's steps run through a pipeline (what :class:`HybridStrategy` does when ``pp > 1``).

Lightning calls ``training_step``, then ``backward``, then the optimizer; a pipeline schedule runs
forward *and* backward of every micro-batch in one call. :class:`PipelineSteps` reconciles the
two: the schedule runs inside ``training_step``, this batch's gradients are set aside and handed
to Lightning in ``backward`` (so gradient accumulation and Lightning's zeroing work as usual), and
the user's own ``training_step``/``validation_step``/... runs on the pipeline's output (broadcast
to every pipeline rank) with the network replaced by a stand-in that returns it, so logging and
metrics work unchanged on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from lightning_distnn.parallel.parallelize import ParallelNet
from lightning_distnn.strategies._common import swapped_child


_SPLIT_MESSAGE = (
    "This network is split over pipeline stages and holds only this rank's layers: run it through the "
    "Trainer (fit/validate/test/predict), or load a checkpoint (it has the full model) into an unsplit module: "
    "lightning_distnn.checkpoint.load_distributed(dir, module), or `distnn-checkpoint consolidate dir` for one "
    "Lightning file that YourModule.load_from_checkpoint reads."
)


class _LocalPart(nn.Module):
    """An intermediate container of :class:`LocalLayers` (e.g. ``layer1`` of a ResNet); not callable."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_SPLIT_MESSAGE)


class LocalLayers(nn.Sequential):
    """This rank's layers of a split network, under their original names (not callable).

    Built from ``(dotted path, module)`` pairs: ``"3"`` for an ``nn.Sequential``'s layer, ``"layer1.0"``
    for a residual block of a ResNet (``layer1`` becomes a container holding ``0``), so the
    LightningModule's state-dict keys stay those of the unsplit network (``net.layer1.0.conv1.weight``)
    and checkpoints reload at another layout.
    """

    def __init__(self, layers: Any = ()) -> None:
        pairs = list(layers.items() if isinstance(layers, Mapping) else layers)
        super().__init__()
        for path, module in pairs:
            *parents, leaf = path.split(".")
            owner: nn.Module = self
            for part in parents:
                child = dict(owner.named_children()).get(part)
                if child is None:
                    child = _LocalPart()
                    owner.add_module(part, child)
                owner = child
            if leaf in dict(owner.named_children()):
                raise ValueError(f"LocalLayers got the layer {path!r} twice.")
            owner.add_module(leaf, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_SPLIT_MESSAGE)


class _Replay(nn.Module):
    """Stands in for the network inside the user's step: returns the pipeline's output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


def split_batch(batch: Any, targets: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, targets)`` of a batch (targets ``None`` for evaluation batches without them)."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and targets:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], None
    if isinstance(batch, torch.Tensor) and not targets:
        return batch, None
    raise TypeError(
        f"pipeline parallelism needs batches of (inputs, targets), got {type(batch).__name__}: return a tuple from "
        "the dataset (e.g. TensorDataset(x, y))."
    )


class PipelineSteps:
    """The pipeline side of a strategy's ``training_step``/``backward``/evaluation steps."""

    def __init__(self, net: ParallelNet, module: nn.Module, attr: str) -> None:
        self.net = net
        self.pipeline = net.pipeline
        self.module = module
        self.attr = attr
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._params: Optional[list[torch.Tensor]] = None  # the module's parameters (fixed after setup)

    def train(self, step: Callable[..., Any], context, *args: Any, **kwargs: Any) -> Any:
        """Run the schedule on the batch, then the user's ``step`` on the pipeline's output.

        Per step this adds to what DDPStrategy does: one message carrying the last stage's output to
        each other pipeline rank (posted before the schedule, so it lands during the last backward),
        and the user's step run on that output instead of a forward (its loss and metrics).
        """
        batch = args[0] if args else kwargs["batch"]
        x, y = split_batch(batch)
        if self._params is None:
            self._params = list(self.module.parameters())
        params = [p for p in self._params if p.requires_grad]  # a callback may freeze layers between steps
        # Lightning zeroes (or keeps, when accumulating) the gradients between training_step and backward:
        # set this batch's gradients aside for `add_gradients`, leaving the earlier ones to Lightning.
        earlier = [p.grad for p in params]
        kept = any(g is not None for g in earlier)
        if kept:
            for p in params:
                p.grad = None
        with context():
            output = self.pipeline.train_step(x, y, share_output=True)
        if self.net.grad_sync is not None:
            self.net.grad_sync()
        self._pending = [(p, p.grad) for p in params if p.grad is not None]
        for p, grad in zip(params, earlier):
            p.grad = grad
        with swapped_child(self.module, self.attr, _Replay(output)), torch.no_grad():
            return step(*args, **kwargs)

    def add_gradients(self) -> None:
        """Hand this batch's gradients to the parameters (what ``backward`` would have produced)."""
        for p, grad in self._pending:
            p.grad = grad if p.grad is None else p.grad + grad
        self._pending = []

    def evaluate(self, step: Callable[..., Any], context, *args: Any, **kwargs: Any) -> Any:
        """A forward-only pass of the batch, then the user's evaluation ``step`` on its output."""
        batch = args[0] if args else kwargs["batch"]
        x, _ = split_batch(batch, targets=False)
        with torch.inference_mode(False), torch.no_grad(), context():
            output = self.pipeline.forward(x.clone() if self.pipeline.is_first else None, int(x.shape[0]))
            output = self.pipeline.broadcast_output(output)
        with swapped_child(self.module, self.attr, _Replay(output)):
            return step(*args, **kwargs)
