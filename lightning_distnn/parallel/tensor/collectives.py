"""Differentiable collectives over the tensor-parallel group: these ARE the traffic of a plan.

Megatron's pair *f* (identity forward, all-reduce backward) and *g* (all-reduce forward, identity
backward), plus an all-gather and a local split that are each other's backward. Activations between
sharded modules are plain local tensors; :func:`local_input` converts one from the layout it is
declared in to the layout a module needs, choosing the collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

__all__ = ["all_reduce_in_backward", "all_reduce_in_forward", "gather_in_forward", "local_input", "mark",
           "split_in_forward"]


class _AllReduceInBackward(torch.autograd.Function):
    """Megatron's *f*: identity forward; the input gradient (partial per rank) is summed backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceInForward(torch.autograd.Function):
    """Megatron's *g*: partial sums all-reduced forward; the replicated gradient passes backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherInForward(torch.autograd.Function):
    """All-gather shards along ``dim`` forward; each rank keeps its chunk of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[dist.get_rank(ctx.group)].contiguous(), None, None


class _SplitInForward(torch.autograd.Function):
    """Keep this rank's chunk of a replicated tensor forward; gather the gradient chunks backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        size = dist.get_world_size(group)
        return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=ctx.dim), None, None


def all_reduce_in_backward(x: torch.Tensor, group) -> torch.Tensor:
    """*f*: ``x`` unchanged; its gradient is summed over ``group`` in backward."""
    return _AllReduceInBackward.apply(x, group)


def all_reduce_in_forward(x: torch.Tensor, group) -> torch.Tensor:
    """*g*: the sum of ``x`` over ``group``; the gradient passes through unchanged."""
    return _AllReduceInForward.apply(x, group)


def gather_in_forward(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The shards of ``x`` over ``group`` concatenated along ``dim``; backward keeps this rank's chunk."""
    return _GatherInForward.apply(x, group, dim)


def split_in_forward(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of a replicated ``x`` along ``dim``; backward all-gathers the gradient."""
    return _SplitInForward.apply(x, group, dim)


def local_input(x, mesh: DeviceMesh, given: Placement, wanted: Placement) -> torch.Tensor:
    """The local tensor of ``x`` in layout ``wanted``; a plain ``x`` is read as layout ``given``."""
    if isinstance(x, DTensor):
        if tuple(x.placements) != (wanted,):
            x = x.redistribute(mesh, [wanted])
        return x.to_local()
    if given == wanted:
        return x
    group = mesh.get_group()
    if isinstance(given, Shard) and isinstance(wanted, Replicate):
        return gather_in_forward(x, group, given.dim)
    if isinstance(given, Replicate) and isinstance(wanted, Shard):
        return split_in_forward(x, group, wanted.dim)
    raise ValueError(f"cannot convert a plain activation from {given} to {wanted}.")


def mark(out: torch.Tensor, mesh: DeviceMesh, placement: Placement, use_local_output: bool):
    """``out`` as is (a plain local tensor), or as a ``DTensor`` in ``placement`` when not ``use_local_output``."""
    return out if use_local_output else DTensor.from_local(out, mesh, [placement], run_check=False)
