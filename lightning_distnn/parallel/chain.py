"""A network whose forward is a chain of its children, seen as an ``nn.Sequential`` of cut points.

The pipeline runtime (:func:`~lightning_distnn.parallel.pipeline.apply_pipeline`) and the model
partitioners work on an ``nn.Sequential``: one stage is a contiguous run of its children. A
torchvision ``ResNet`` is not one, but its ``forward`` calls its children in a fixed order with
functional glue in between (``torch.flatten`` before ``fc``). :func:`chain_as_sequential` lists
that order from the one table of known chains (:mod:`lightning_distnn.parallel.tensor.walk`), with

* nested ``nn.Sequential`` s entered, so every residual block of ``layer1..layer4`` is a cut point,
* functional glue as a stage-local, parameter-free module (``nn.Flatten(1)`` for ``torch.flatten``),
* a stateless in-place activation at the top of the chain (ResNet's ``relu``, ``inplace=True``) as an
  out-of-place copy: the first layer of a stage receives a leaf tensor that requires grad (the
  received activation, or the partitioner's profiling input), which autograd forbids modifying
  in place. The arithmetic is the same; the layer holds no state, so nothing is lost from the network,

and returns an ``nn.Sequential`` *view* that shares the modules (training it trains the network)
plus each layer's dotted path in the original network (``"layer1.0"``), which the strategies use to
keep checkpoint keys those of the unsplit model. Pure torch.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from lightning_distnn.parallel.tensor.walk import GLUE_FLATTEN, chain_of, overridden_chain, units

__all__ = ["ChainView", "buffers_kept", "chain_as_sequential", "is_glue", "splittable", "stateful_layers", "unsplittable_reason"]


@dataclass(frozen=True)
class ChainView:
    """``sequential`` (an ``nn.Sequential`` sharing the modules) and ``names[i]``, the dotted path of its layer ``i``
    in the original network (a glue layer's name is in parentheses, e.g. ``"(torch.flatten)"``)."""

    sequential: nn.Sequential
    names: tuple[str, ...]

    def __iter__(self):  # unpacks as (sequential, names)
        return iter((self.sequential, self.names))

    def table(self) -> str:
        rows = [f"{i:>4}  {name:<24} {type(m).__name__}" for i, (name, m) in enumerate(zip(self.names, self.sequential))]
        return "\n".join(["   #  layer                    kind", *rows])

    __str__ = table


def is_glue(name: str) -> bool:
    """Whether ``name`` is a synthetic glue layer (functional code of the chain's forward, no state)."""
    return name.startswith("(") and name.endswith(")") or name == GLUE_FLATTEN


def splittable(net: nn.Module) -> bool:
    """Whether :func:`chain_as_sequential` can list ``net``'s layers."""
    return isinstance(net, nn.Sequential) or chain_of(net) is not None


def unsplittable_reason(net: nn.Module, where: str = "the network") -> str:
    """Why ``net`` cannot be split, and what to do (for error messages)."""
    kind = type(net).__name__
    base = overridden_chain(net)
    why = (
        f"{kind} overrides the forward of {base}, so the order of its children is unknown"
        if base is not None
        else f"{kind}'s forward is not a known chain of its children"
    )
    return (
        f"{where} ({kind}) cannot be split into pipeline stages or walked by the tensor-parallel plan: {why}. "
        "Model-parallel strategies take an nn.Sequential or a known chain of children (torchvision's ResNet with its "
        f"own forward, see lightning_distnn.parallel.tensor.walk). Rewrite {kind} as an nn.Sequential of blocks "
        "(functional code such as torch.flatten becomes nn.Flatten()), keep torchvision's forward, or train it with a "
        "data-parallel strategy (distnn_dp, distnn_ps, distnn_local_sgd). Under a pipeline (tp=1) any network is cut by "
        "torch's tracer instead: name the modules to cut before, partition=['encoder.block3', 'decoder'], or call "
        "torch.distributed.pipelining.pipe_split() in its forward (lightning_distnn.parallel.traced)."
    )


def chain_as_sequential(net: nn.Module) -> ChainView:
    """The layers of ``net`` in forward order as an ``nn.Sequential`` view, with their original names.

    An ``nn.Sequential`` is its own view (its children, names ``"0"``, ``"1"``, ...). A known chain of
    children (torchvision's ``ResNet``) is listed by the walk's chain table with nested Sequentials
    entered: ``conv1, bn1, relu, maxpool, layer1.0, layer1.1, ..., layer4.1, avgpool, (torch.flatten), fc``.
    Anything else raises ``TypeError`` naming the module and the options.
    """
    if isinstance(net, nn.Sequential):
        names = tuple(name for name, _ in net.named_children())
        return ChainView(net, names)
    if chain_of(net) is None:
        raise TypeError(unsplittable_reason(net))
    layers = units(net)  # one table: the same chain the tensor-parallel plan walks
    names = tuple(u.name for u in layers)
    if len(set(names)) != len(names):  # pragma: no cover - a chain table listing a child twice
        raise ValueError(f"{type(net).__name__}'s chain lists a layer twice: {names}.")
    return ChainView(nn.Sequential(*[_out_of_place(u.module) for u in layers]), names)


@contextmanager
def buffers_kept(net: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``net`` afterwards (BatchNorm's running statistics and batch counts).

    The strategies run the network before training (checking its forward, profiling the layers
    for the balanced partition); in training mode that would update BatchNorm's running
    statistics, which one process never sees, so they are put back.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in net.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _out_of_place(module: nn.Module) -> nn.Module:
    """``module``, or an out-of-place copy of it if it is a stateless in-place activation."""
    if getattr(module, "inplace", False) is True and not any(True for _ in module.parameters()) and not any(
        True for _ in module.buffers()
    ):
        module = copy.copy(module)
        module.inplace = False
    return module


def stateful_layers(view: ChainView, indices: Iterable[int]) -> list[tuple[str, nn.Module]]:
    """(original dotted path, module) of the layers ``indices`` that hold state (glue layers dropped)."""
    return [(view.names[i], view.sequential[i]) for i in indices if not is_glue(view.names[i])]

