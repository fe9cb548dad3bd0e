"""The private torch APIs tensor parallelism touches, one small function each.

These belong in :mod:`lightning_distnn._compat` (the one home of private touches); they live here
until that move so the rest of :mod:`lightning_distnn.parallel.tensor` calls only these names.
Each was checked against torch 2.14.1.

A third touch is structural and cannot be a function: our styles subclass
``torch.distributed.tensor.parallel.ParallelStyle`` and implement its abstract ``_apply(module,
device_mesh)`` and read its ``src_data_rank`` class attribute, which is how ``parallelize_module``
calls a style (torch's own ``ColwiseParallel`` does the same). If ``parallelize_module`` stops
calling ``_apply``, ``apply_tp`` raises ``TypeError`` (abstract class) or leaves layers unsharded;
the equivalence tests in ``tests/test_tensor_parallel.py`` catch both.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["conv2d_forward", "swap_forward"]

_SWAPPED: dict[tuple[type, str], type] = {}


def swap_forward(module: nn.Module, tag: str, forward: Callable) -> None:
    """Give ``module`` a cached subclass named ``{tag}{Base}`` whose ``forward`` is ``forward``.

    Private touch: assigns ``module.__class__`` (FSDP2's ``fully_shard`` does the same). The module
    keeps its parameters, hooks, ``repr`` and ``isinstance(module, Base)``; only the forward changes.
    Checked: torch 2.14.1. If ``nn.Module`` ever forbids ``__class__`` assignment (slots, a metaclass
    check), this raises ``TypeError`` at ``apply_tp``; the fallback is to wrap the module in a parent
    whose forward calls ours, which changes state-dict keys (so checkpoints) and must be avoided.
    """
    base = type(module)
    key = (base, tag)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{tag}{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    module.__class__ = _SWAPPED[key]


def conv2d_forward(
    conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``conv`` applied to ``x`` with the given (local shard) ``weight`` and ``bias``.

    Private touch: ``nn.Conv2d._conv_forward(input, weight, bias)``, which applies the layer's
    stride, dilation, groups and padding, including ``padding_mode`` other than ``"zeros"`` (through
    the private ``_reversed_padding_repeated_twice``). Checked: torch 2.14.1 (present since 1.8). If
    it is renamed or its signature changes, every sharded convolution fails with ``AttributeError``
    or ``TypeError`` at its first forward; the replacement is ``F.conv2d`` with those attributes
    and an explicit ``F.pad`` for non-zero padding modes.
    """
    return conv._conv_forward(x, weight, bias)
