"""The modules of a network in the order its forward runs them: what the plan walks.

Three shapes are understood:

* ``nn.Sequential`` (nested ones are entered): its children in order.
* A **chain of children**: a known network class whose forward calls its children one after the
  other with functional glue in between (torchvision's ``ResNet``: conv1, bn1, relu, maxpool,
  layer1..layer4, avgpool, ``torch.flatten``, fc). The glue appears as a synthetic unit (an
  ``nn.Flatten`` named ``(torch.flatten)``) so the plan sees what it does to the layout. torchvision's
  ``VGG`` and ``AlexNet`` (features, avgpool, ``torch.flatten``, classifier) are chains too.
* A **residual block** (torchvision's ``BasicBlock`` / ``Bottleneck``): one unit that carries its
  main path (the branch, e.g. conv1, bn1, relu, conv2, bn2) and its shortcut (``downsample``).

A class is only trusted while the methods whose code defines the order are not overridden; a
subclass with its own ``forward`` is an unknown module (a chain at the top is refused by the plan).
Anything else is one unit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["GLUE", "GLUE_FLATTEN", "GLUE_POOL", "Residual", "Unit", "chain_of", "leaves", "overridden_chain", "residual_of", "units",
           "walkable"]

#: Name of the synthetic unit standing for a functional ``torch.flatten(x, 1)`` in a chain's forward.
GLUE_FLATTEN = "(torch.flatten)"
#: ... and for MobileNetV2's functional ``adaptive_avg_pool2d(x, (1, 1))``.
GLUE_POOL = "(adaptive_avg_pool2d)"
#: what each glue step does, as a parameter-free module
GLUE = {GLUE_FLATTEN: lambda: nn.Flatten(1), GLUE_POOL: lambda: nn.AdaptiveAvgPool2d((1, 1))}


@dataclass(frozen=True)
class _Known:
    """A class whose forward we know: ``steps`` (chains) or ``branch`` + ``shortcut`` (residual blocks)."""

    cls: type
    methods: tuple[str, ...]
    steps: tuple[str, ...] = ()
    branch: tuple[str, ...] = ()
    shortcut: str = ""

    def trusts(self, module: nn.Module) -> bool:
        return isinstance(module, self.cls) and all(
            getattr(type(module), m) is getattr(self.cls, m) for m in self.methods
        )


def _known() -> tuple[list[_Known], list[_Known]]:
    """(chains, residual blocks) of the libraries already imported (torchvision is never imported here)."""
    chains: list[_Known] = []
    blocks: list[_Known] = []
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        chains.append(_Known(resnet.ResNet, ("forward", "_forward_impl"), steps=(
            "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", GLUE_FLATTEN, "fc")))
        blocks.append(_Known(resnet.BasicBlock, ("forward",), branch=("conv1", "bn1", "relu", "conv2", "bn2"),
                             shortcut="downsample"))
        blocks.append(_Known(resnet.Bottleneck, ("forward",), branch=(
            "conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"), shortcut="downsample"))
    for module_name, cls_name in (("torchvision.models.vgg", "VGG"), ("torchvision.models.alexnet", "AlexNet")):
        lib = sys.modules.get(module_name)
        if lib is not None:  # forward: features, avgpool, torch.flatten(x, 1), classifier
            chains.append(_Known(getattr(lib, cls_name), ("forward",),
                                 steps=("features", "avgpool", GLUE_FLATTEN, "classifier")))
    mobilenet = sys.modules.get("torchvision.models.mobilenetv2")
    if mobilenet is not None:  # features, adaptive_avg_pool2d, flatten, classifier; a block: x + conv(x) or conv(x)
        chains.append(_Known(mobilenet.MobileNetV2, ("forward", "_forward_impl"),
                             steps=("features", GLUE_POOL, GLUE_FLATTEN, "classifier")))
        blocks.append(_Known(mobilenet.InvertedResidual, ("forward",), branch=("conv",)))
    mobilenet3 = sys.modules.get("torchvision.models.mobilenetv3")
    if mobilenet3 is not None:
        chains.append(_Known(mobilenet3.MobileNetV3, ("forward", "_forward_impl"),
                             steps=("features", "avgpool", GLUE_FLATTEN, "classifier")))
        blocks.append(_Known(mobilenet3.InvertedResidual, ("forward",), branch=("block",)))
    return chains, blocks


def chain_of(module: nn.Module) -> Optional[_Known]:
    """The known chain ``module`` is (its forward not overridden), else ``None``."""
    return next((k for k in _known()[0] if k.trusts(module)), None)


def residual_of(module: nn.Module) -> Optional[_Known]:
    """The known residual block ``module`` is (its forward not overridden), else ``None``."""
    return next((k for k in _known()[1] if k.trusts(module)), None)


def overridden_chain(module: nn.Module) -> Optional[str]:
    """The known chain class ``module`` derives from while overriding its forward, else ``None``."""
    return next((k.cls.__name__ for k in _known()[0] if isinstance(module, k.cls) and not k.trusts(module)), None)


def walkable(module: nn.Module) -> bool:
    """Whether :func:`units` can list ``module``'s children in forward order."""
    return isinstance(module, nn.Sequential) or chain_of(module) is not None


@dataclass
class Residual:
    """A residual block's two paths: ``out = relu(branch(x) + shortcut(x))``."""

    branch: list["Unit"]
    shortcut: Optional["Unit"]


@dataclass
class Unit:
    """One planned module in forward order; ``residual`` is set for a residual block."""

    name: str
    module: nn.Module
    residual: Optional[Residual] = None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unit(name: str, module: nn.Module) -> list[Unit]:
    if walkable(module):
        return units(module, name)
    block = residual_of(module)
    if block is None:
        return [Unit(name, module)]
    branch = [u for child in block.branch for u in _unit(_join(name, child), getattr(module, child))]
    shortcut = getattr(module, block.shortcut, None) if block.shortcut else None
    if shortcut is not None:
        shortcut = Unit(_join(name, block.shortcut), shortcut)
    return [Unit(name, module, Residual(branch, shortcut))]


def units(module: nn.Module, prefix: str = "") -> list[Unit]:
    """The units of a walkable ``module`` in forward order (nested Sequentials and chains entered)."""
    if isinstance(module, nn.Sequential):
        out: list[Unit] = []
        for name, child in module.named_children():
            out.extend(_unit(_join(prefix, name), child))
        return out
    chain = chain_of(module)
    if chain is None:
        raise TypeError(f"{type(module).__name__} is neither an nn.Sequential nor a known chain of children.")
    out = []
    for step in chain.steps:
        if step in GLUE:
            out.append(Unit(_join(prefix, step), GLUE[step]()))
        else:
            out.extend(_unit(_join(prefix, step), getattr(module, step)))
    return out


def _flat(unit: Unit) -> list[tuple[str, nn.Module]]:
    if unit.residual is None:
        return [(unit.name, unit.module)]
    rows = [row for u in unit.residual.branch for row in _flat(u)]
    if unit.residual.shortcut is not None:
        rows.append((unit.residual.shortcut.name, unit.residual.shortcut.module))
    return rows + [(unit.name, unit.module)]


def leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of every row a plan of ``module`` has, in plan order.

    Nested ``nn.Sequential`` s and known chains are entered; a residual block contributes its branch
    modules, its shortcut, then itself (the residual add); a functional ``torch.flatten`` of a chain
    is a synthetic ``nn.Flatten`` named :data:`GLUE_FLATTEN`; anything else is one row. A module that
    is neither walkable nor a block is its own single row.
    """
    if not walkable(module):
        return [(prefix, module)]
    return [row for unit in units(module, prefix) for row in _flat(unit)]
