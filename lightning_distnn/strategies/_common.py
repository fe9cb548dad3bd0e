"""Small helpers shared by the strategies (no strategy logic lives here)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Union

from torch import nn

DEFAULT_TIMEOUT = timedelta(seconds=int(os.environ.get("DISTNN_TIMEOUT_S", "300")))


def as_timedelta(timeout: Union[None, int, float, timedelta]) -> timedelta:
    """Seconds or a timedelta; ``None`` means the package default (env ``DISTNN_TIMEOUT_S``, 300 s)."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be a positive number of seconds.")
    return timedelta(seconds=float(timeout))


def world_size_of(strategy) -> int:
    """Processes the Trainer will run: devices per node x nodes (known before launch)."""
    devices = len(strategy.parallel_devices) if strategy.parallel_devices is not None else 1
    return devices * getattr(strategy, "num_nodes", 1)


def sequential_of(module: nn.Module, attr: Optional[str] = None) -> tuple[str, nn.Sequential]:
    """The ``nn.Sequential`` network of a LightningModule (the model-parallel contract).

    With ``attr`` the attribute is named; otherwise the only direct ``nn.Sequential`` child is used.
    """
    if attr is not None:
        net = getattr(module, attr, None)
        if not isinstance(net, nn.Sequential):
            raise TypeError(
                f"{type(module).__name__}.{attr} is {type(net).__name__}, not nn.Sequential: model-parallel "
                "strategies need the network as an nn.Sequential attribute (see ImageClassifier.net)."
            )
        return attr, net
    found = [(name, child) for name, child in module.named_children() if isinstance(child, nn.Sequential)]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise TypeError(
            f"{type(module).__name__} must hold exactly one nn.Sequential attribute for model-parallel "
            f"strategies (found: {names}). Store the network as e.g. `self.net = nn.Sequential(...)`, or name it "
            "with the strategy's `module_attr` argument."
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
