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


class OutputShare:
    """The last stage's output of each training step on every rank of the pipeline group, at the cost of one message.

    The first step of each kind (``key``: the batch size, known on every rank) broadcasts the header
    and the data (:func:`broadcast_tensor`); later steps of that kind send the data only, point to point
    with their own tag, into a buffer each receiver keeps per kind (so a receiver's output is
    overwritten by the next step of that kind: clone it to keep it). On gloo the receive is posted
    before the schedule step (:meth:`post`), so the output arrives while the rank still computes its
    last backward; the source's sends complete in the background and are waited on at the next step.
    Other backends ignore the tag and match a pair's messages in posting order, so there the receive
    is posted after the schedule's own.
    """

    TAG = 4517  # any tag the schedules do not use (they use 0)

    def __init__(self, group: dist.ProcessGroup, group_src: int, device: torch.device) -> None:
        self.group, self.src, self.device = group, group_src, device
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.early = dist.get_backend(group) == "gloo"
        self._like: dict = {}
        self._buffers: dict = {}
        self._sends: list = []
        self._sent: Optional[torch.Tensor] = None
        self._recv = None
        self.last_bytes = 0  # bytes of the last output shared point to point (0: none yet)

    def bytes_per_step(self) -> dict[str, int]:
        """What sharing the last output costs this rank per step (the point-to-point form of later steps)."""
        if self.size == 1:
            return {"sent": 0, "received": 0}
        if self.rank == self.src:
            return {"sent": self.last_bytes * (self.size - 1), "received": 0}
        return {"sent": 0, "received": self.last_bytes}

    def flush(self) -> None:
        """Wait for the source's sends of the previous step (and drop its reference to the tensor)."""
        for work in self._sends:
            work.wait()
        self._sends, self._sent = [], None

    def post(self, key) -> None:
        """Before the schedule step: finish the previous sends; on gloo, post this step's receive."""
        self.flush()
        if self.early and self.rank != self.src and key in self._buffers:
            self._recv = dist.irecv(self._buffers[key], group=self.group, group_src=self.src, tag=self.TAG)

    def finish(self, key, output: Optional[torch.Tensor]) -> torch.Tensor:
        """After the schedule step: the output on every rank (the source passes it, the others ``None``)."""
        if self.size == 1:
            return output
        if key not in self._like:
            out = broadcast_tensor(output, self.src, self.group, self.device)
            self._like[key] = (tuple(out.shape), out.dtype)
            self.last_bytes = out.numel() * out.element_size()
            if self.rank != self.src:
                self._buffers[key] = torch.empty_like(out)
            return out
        if self.rank == self.src:
            shape, dtype = self._like[key]
            if tuple(output.shape) != shape or output.dtype != dtype:
                raise ValueError(
                    f"the last stage's output changed from shape {shape} ({dtype}) to {tuple(output.shape)} "
                    f"({output.dtype}) between two training batches of the same size: pipeline stages must return "
                    "outputs whose shape depends on the batch size only."
                )
            self._sent = output.detach().contiguous()
            self._sends = [
                dist.isend(self._sent, group=self.group, group_dst=r, tag=self.TAG) for r in range(self.size) if r != self.src
            ]
            return self._sent
        if self._recv is None:
            self._recv = dist.irecv(self._buffers[key], group=self.group, group_src=self.src, tag=self.TAG)
        self._recv.wait()
        self._recv = None
        return self._buffers[key]
