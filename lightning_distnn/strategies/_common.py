"""Small helpers shared by the strategies (no strategy logic lives here)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_distnn.parallel.chain import splittable, unsplittable_reason

Timeout = Union[None, int, float, str, timedelta]
TIMEOUT_ENV = "DISTNN_TIMEOUT_S"


def _seconds(value: Union[int, float, str], where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}={value!r} is not a number of seconds: give e.g. 300 or 42.5."
        ) from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{where}={value!r} must be a positive, finite number of seconds, e.g. 300.")
    return seconds


def as_timedelta(timeout: Timeout) -> timedelta:
    """Seconds (a number, or a string such as ``"42.5"``) or a timedelta; ``None`` means the package
    default: env ``DISTNN_TIMEOUT_S`` if set, else 300 s. Anything else is refused with the fix."""
    if timeout is None:
        env = os.environ.get(TIMEOUT_ENV)
        return timedelta(seconds=_seconds(env, f"environment variable {TIMEOUT_ENV}") if env else 300.0)
    if isinstance(timeout, timedelta):
        if timeout.total_seconds() <= 0:
            raise ValueError(f"timeout={timeout!r} must be positive.")
        return timeout
    if isinstance(timeout, bool):
        raise ValueError(f"timeout={timeout!r} is not a number of seconds: give e.g. timeout=300.")
    return timedelta(seconds=_seconds(timeout, "timeout"))


def world_size_of(strategy) -> int:
    """Processes the Trainer will run: devices per node x nodes (known before launch)."""
    devices = len(strategy.parallel_devices) if strategy.parallel_devices is not None else 1
    return devices * getattr(strategy, "num_nodes", 1)


def sequential_of(module: nn.Module, attr: Optional[str] = None) -> tuple[str, nn.Module]:
    """The network of a LightningModule (the model-parallel contract): ``(attribute name, network)``.

    The network is an ``nn.Sequential`` or a network whose forward is a known chain of its children
    (torchvision's ``ResNet``; see :func:`lightning_distnn.parallel.chain.chain_as_sequential`, which
    turns either into the ``nn.Sequential`` of cut points the pipeline splits). With ``attr`` the
    attribute is named; otherwise the only such direct child is used.
    """
    if attr is not None:
        net = getattr(module, attr, None)
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"{type(module).__name__}.{attr} is {type(net).__name__}, not a network: model-parallel strategies "
                "need the network as a module attribute (see ImageClassifier.net); fix the strategy's module_attr."
            )
        if not splittable(net):
            raise TypeError(unsplittable_reason(net, f"{type(module).__name__}.{attr}"))
        return attr, net
    found = [(name, child) for name, child in module.named_children() if splittable(child)]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        others = [f"{name} ({type(child).__name__})" for name, child in module.named_children() if not splittable(child)]
        hint = ""
        if not found and others:
            hint = (
                f" Its children {', '.join(others)} are neither: a network whose forward does more than call its "
                "children in a known order cannot be split (rewrite it as an nn.Sequential of blocks, keep "
                "torchvision's ResNet forward, or use a data-parallel strategy)."
            )
        raise TypeError(
            f"{type(module).__name__} must hold exactly one nn.Sequential (or known chain of children, such as "
            f"torchvision's ResNet) as its network for model-parallel strategies (found: {names}).{hint} Store "
            "the network as e.g. `self.net = nn.Sequential(...)` / `self.net = resnet18()`, or name it with the "
            "strategy's `module_attr` argument."
        )
    return found[0]


def loss_fn_of(module: nn.Module):
    loss_fn = getattr(module, "loss_fn", None)
    if not callable(loss_fn):
        raise TypeError(
            f"{type(module).__name__} has no `loss_fn(outputs, targets)` method: model-parallel strategies compute "
            "the loss on the last stage and need it. Add e.g. `def loss_fn(self, outputs, targets): return "
            "F.cross_entropy(outputs, targets)`."
        )
    return loss_fn


def register_strategy(cls, strategy_registry, description: str) -> None:
    """Register ``cls`` under its ``strategy_name`` (what each strategy's ``register_strategies`` does)."""
    strategy_registry.register(cls.strategy_name, cls, description=description, override=True)


@contextmanager
def swapped_child(module: nn.Module, name: str, replacement: nn.Module):
    """Temporarily replace the child ``name`` of ``module`` (restored afterwards, also on errors)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield replacement
    finally:
        setattr(module, name, original)


class _Spy(nn.Module):
    """Wraps the network: records what it is called with and what it returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple] = []
        self.outputs: list[Any] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        self.outputs.append(self.net(*args, **kwargs))
        return self.outputs[-1]


def check_forward_is_network(module: nn.Module, attr: str, example: torch.Tensor) -> None:
    """Refuse a LightningModule whose ``forward`` does more than ``self.<attr>(x)``.

    Under pipeline parallelism the first stage receives the batch's inputs as they are and the
    module's output is the last stage's output, so preprocessing before the network, a head after
    it, or a second call would be skipped silently. Checked once, before the first step, by
    running ``forward`` on an example with the network wrapped by a recorder.
    """
    spy = _Spy(getattr(module, attr))
    with swapped_child(module, attr, spy), torch.no_grad():
        out = module(example)
    passed_through = len(spy.calls) == 1 and len(spy.calls[0]) == 1 and spy.calls[0][0] is example
    if not (passed_through and out is spy.outputs[0]):
        what = (
            f"calls self.{attr} {len(spy.calls)} times" if len(spy.calls) != 1
            else f"changes the input before self.{attr}" if not passed_through
            else f"changes the output of self.{attr}"
        )
        raise ValueError(
            f"{type(module).__name__}.forward {what}: the pipeline runs only the layers of self.{attr} (the first "
            "stage gets the batch's inputs unchanged, the last stage's output is the module's output), so that work "
            f"would be skipped. Move it into the nn.Sequential (e.g. append the head as its last layer, or "
            f"preprocess in the dataset), or use a data-parallel or tensor-parallel strategy."
        )


def rebuilt_loader(dataloader, dataset=None, **changes):
    """A copy of a ``DataLoader`` with the same workers, collation and sampling options, over
    ``dataset`` (default: the same) and with ``changes`` applied (e.g. ``batch_size=``)."""
    from torch.utils.data import DataLoader

    options: dict[str, Any] = dict(
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
    options.update(changes)
    return DataLoader(dataloader.dataset if dataset is None else dataset, **options)
