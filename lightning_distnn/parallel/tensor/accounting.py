"""What a tensor-parallel plan costs: parameter elements per rank and bytes on the wire per step."""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from lightning_distnn.parallel.tensor.data import REPLICATE, TPPlan
from lightning_distnn.parallel.tensor.walk import leaves

__all__ = ["activation_numel", "comm_bytes", "sharded_parameter_numel"]


def sharded_parameter_numel(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full tensors) over the DTensor parameters of ``module``."""
    local = full = 0
    for p in module.parameters():
        if isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements):
            local += p.to_local().numel()
            full += p.numel()
    return local, full


def comm_bytes(plan: TPPlan, activation_numel: Mapping[str, tuple[int, int]], *, element_size: int = 4,
               input_requires_grad: bool = False) -> dict[str, int]:
    """Analytic bytes this rank sends and receives per training step (forward + backward) for a plan.

    ``activation_numel[name] = (input elements, output elements)`` of each module, as the full (global)
    tensor of the local batch. Collectives are counted as ring algorithms over ``tp`` ranks: an
    all-reduce of ``n`` bytes sends and receives ``2 (tp-1)/tp * n``, an all-gather of ``n`` bytes
    (the gathered size) ``(tp-1)/tp * n``. The first layer's input gradient is not computed unless
    ``input_requires_grad``.
    """
    tp = plan.tp
    if tp == 1:
        return {"sent": 0, "received": 0}
    ring = (tp - 1) / tp
    total = 0.0
    first = True
    for e in plan.entries:
        if e.name not in activation_numel:
            continue
        n_in, n_out = (n * element_size for n in activation_numel[e.name])
        grad_in = input_requires_grad or not first
        if e.style in ("colwise", "rowwise", "replicate"):
            first = False
        if e.style == "colwise":
            if e.input != REPLICATE:
                total += ring * n_in  # all-gather forward
                if grad_in:
                    total += 2 * ring * n_in  # all-reduce of the gathered input gradient backward
            elif grad_in:
                total += 2 * ring * n_in  # f: input-gradient all-reduce backward
            if e.output == REPLICATE:
                total += ring * n_out  # all-gather of the output forward (backward keeps a chunk)
        elif e.style == "rowwise":
            total += 2 * ring * n_out  # g: partial-sum all-reduce forward
            if e.input == REPLICATE and grad_in:
                total += ring * n_in  # gradient all-gather backward
    return {"sent": int(round(total)), "received": int(round(total))}


def module_numel(module: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(input, output) elements of the named submodules of ``module`` in one forward of ``x`` without gradients."""
    modules = dict(module.named_modules())
    numel: dict[str, tuple[int, int]] = {}
    hooks = [modules[name].register_forward_hook(
        lambda mod, inputs, output, name=name: numel.__setitem__(name, (int(inputs[0].numel()), int(output.numel()))))
        for name in names]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return numel


def activation_numel(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(input, output) elements of every Conv2d/Linear of an *unsharded* ``module`` on input ``x``.

    The argument :func:`comm_bytes` takes, measured on one process before sharding: one forward
    without gradients in eval mode on a copy (so BatchNorm running statistics are not touched).
    """
    probe = copy.deepcopy(module).eval()
    return module_numel(probe, x, [name for name, child in leaves(probe) if isinstance(child, (nn.Conv2d, nn.Linear))])
