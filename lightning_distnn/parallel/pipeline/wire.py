"""One wire format for tensors whose shape the receiver does not know: a fixed header, then the data.

The header is 10 int64s: the number of dims, the dtype's index in :data:`DTYPES`, then up to
:data:`MAX_DIMS` sizes. Used point to point (:func:`send_tensor` / :func:`recv_tensor`, the
forward-only pass of the V schedules) and as a broadcast (:func:`broadcast_tensor`, the last
stage's output to every pipeline rank).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
MAX_DIMS = 8
HEADER_LEN = 2 + MAX_DIMS


def header_of(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The header describing ``t`` (dims, dtype, shape), on ``device``."""
    if t.dim() > MAX_DIMS:
        raise ValueError(
            f"pipeline stages exchange tensors of at most {MAX_DIMS} dims here, got one of shape {tuple(t.shape)}: "
            "flatten the extra dims inside the stage."
        )
    if t.dtype not in DTYPES:
        raise ValueError(
            f"pipeline stages exchange tensors of dtype {', '.join(map(str, DTYPES))}, got {t.dtype}: cast the "
            "stage output to one of them."
        )
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = t.dim(), DTYPES.index(t.dtype)
    header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header.to(device)


def empty_from_header(header: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of the shape and dtype a header describes."""
    header = header.cpu()
    shape = [int(d) for d in header[2 : 2 + int(header[0])]]
    return torch.empty(shape, dtype=DTYPES[int(header[1])], device=device)


def send_tensor(t: torch.Tensor, group_dst: int, group: dist.ProcessGroup) -> None:
    """Send ``t`` (header, then data) to the rank ``group_dst`` of ``group``."""
    dist.send(header_of(t, t.device), group=group, group_dst=group_dst)
    dist.send(t.contiguous(), group=group, group_dst=group_dst)


def recv_tensor(group_src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    """Receive a tensor sent by :func:`send_tensor` from the rank ``group_src`` of ``group``."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=group_src)
    out = empty_from_header(header, device)
    dist.recv(out, group=group, group_src=group_src)
    return out


def broadcast_tensor(
    t: Optional[torch.Tensor],
    group_src: int,
    group: dist.ProcessGroup,
    device: torch.device,
    *,
    like: Optional[tuple[tuple[int, ...], torch.dtype]] = None,
) -> torch.Tensor:
    """``t`` from the rank ``group_src`` of ``group`` on every rank of it (others pass ``None``).

    ``like`` = (shape, dtype) known on every rank skips the header broadcast (one collective less);
    every rank must pass the same ``like``.
    """
    src = dist.get_rank(group) == group_src
    if like is None:
        header = header_of(t, device) if src else torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
        dist.broadcast(header, group=group, group_src=group_src)
        if not src:
            t = empty_from_header(header, device)
    elif not src:
        t = torch.empty(like[0], dtype=like[1], device=device)
    elif tuple(t.shape) != tuple(like[0]) or t.dtype != like[1]:
        raise ValueError(
            f"broadcast_tensor(like={like}) got a tensor of shape {tuple(t.shape)} and dtype {t.dtype} on the source "
            "rank: the output shape changed between steps of the same batch size; pass like=None."
        )
    t = t.detach().contiguous()
    dist.broadcast(t, group=group, group_src=group_src)
    return t
