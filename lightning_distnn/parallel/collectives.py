"""Small collective helpers shared by the strategies."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of a DTensor (the tensor itself otherwise); a view, so in-place
    updates under ``no_grad`` reach the DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def flat_average_(
    tensors: Iterable[torch.Tensor],
    *,
    group: Optional[dist.ProcessGroup] = None,
    wire_dtype: Optional[torch.dtype] = None,
) -> int:
    """Replace every tensor in place by its mean over ``group``, in one flat all-reduce.

    DTensors are averaged through their local shards (the group's peers hold the same shard).
    ``wire_dtype`` (e.g. ``torch.float16``) sends the buffer in that precision. Returns the bytes
    of the all-reduced buffer (the payload), for communication accounting.
    """
    parts = [local_part(t) for t in tensors]
    if not parts:
        return 0
    flat = torch.cat([t.reshape(-1) for t in parts])
    wire = flat if wire_dtype is None else flat.to(wire_dtype)
    dist.all_reduce(wire, group=group)
    if wire is not flat:
        flat = wire.to(flat.dtype)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for t in parts:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return wire.numel() * wire.element_size()


@torch.no_grad()
def broadcast_replicas_(
    module: nn.Module,
    *,
    group: Optional[dist.ProcessGroup],
    plain_only: bool = False,
) -> None:
    """Give every rank of ``group`` the parameters and buffers of ``module`` that the group's first rank holds.

    Replicas must start equal: Lightning's launcher runs the user's script once per rank, so a model
    built without a seed is initialised differently on each (DDP broadcasts at wrap time for the same
    reason). DTensors go through their local shards (the group's peers hold the same shard);
    ``plain_only`` skips them (over a tensor-parallel group, whose DTensors were already distributed
    from one rank). One broadcast per dtype, flat.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not (plain_only and isinstance(t, DTensor))]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(local_part(t))
    src = dist.get_global_rank(group, 0)
    for parts in by_dtype.values():
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
