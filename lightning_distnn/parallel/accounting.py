"""Communication accounting: bytes each rank sends and receives per optimizer step.

Counts are taken where this package hands tensors to torch.distributed (point-to-point sends and
receives of the parameter server, the buckets a DDP communication hook all-reduces or
all-gathers, the parameters local SGD averages). Point-to-point counts are exact. Collectives
are converted to per-rank link traffic with the bandwidth-optimal ring algorithm:

=================  ============================  ============================
collective         sent per rank                 received per rank
=================  ============================  ============================
all-reduce of N    2 (W-1)/W * N                 2 (W-1)/W * N
all-gather of N    (W-1) * N  (N = own share)    (W-1) * N
send / recv of N   N                             N
=================  ============================  ============================

``payload`` is what the rank contributes before the algorithm's factor (N above), the figure
the analytic functions below predict, e.g. PowerSGD of rank ``r`` on an ``n x m`` gradient
contributes ``r (n + m)`` values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch


def ring_allreduce_bytes(nbytes: float, world_size: int) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


def ring_allgather_bytes(nbytes: float, world_size: int) -> float:
    """Bytes one rank sends (and receives) when all-gathering ``nbytes`` from every rank."""
    return float(world_size - 1) * nbytes


@dataclass
class CommCounter:
    """Thread-safe running totals of bytes for one rank (the parameter server thread adds too)."""

    sent: float = 0.0
    received: float = 0.0
    payload: float = 0.0
    steps: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, sent: float = 0.0, received: float = 0.0, payload: float = 0.0) -> None:
        with self._lock:
            self.sent += sent
            self.received += received
            self.payload += payload

    def allreduce(self, nbytes: float, world_size: int) -> None:
        traffic = ring_allreduce_bytes(nbytes, world_size)
        self.add(sent=traffic, received=traffic, payload=nbytes)

    def allgather(self, nbytes: float, world_size: int) -> None:
        traffic = ring_allgather_bytes(nbytes, world_size)
        self.add(sent=traffic, received=traffic, payload=nbytes)

    def step(self) -> None:
        with self._lock:
            self.steps += 1

    def per_step(self) -> dict[str, float]:
        """Bytes per optimizer step so far: ``sent``, ``received``, ``payload`` and ``steps``."""
        with self._lock:
            n = max(self.steps, 1)
            return {"sent": self.sent / n, "received": self.received / n, "payload": self.payload / n, "steps": self.steps}


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---- analytic payloads (values, not bytes; multiply by the element size) ---------------------


def _matrix(shape: Sequence[int]) -> tuple[int, int]:
    n = int(shape[0]) if len(shape) else 1
    m = 1
    for d in shape[1:]:
        m *= int(d)
    return n, m


def powersgd_values(shapes: Iterable[Sequence[int]], rank: int, min_compression_rate: float = 2.0) -> int:
    """Values PowerSGD (torch's ``powerSGD_hook``) all-reduces for gradients of ``shapes``.

    A gradient viewed as ``n x m`` (first dim x the rest) is compressed to ``r' (n + m)`` values,
    ``r' = min(n, m, rank)``, when ``r' (n + m) * min_compression_rate < n m``; otherwise its
    ``n m`` values are all-reduced as they are.
    """
    total = 0
    for shape in shapes:
        n, m = _matrix(shape)
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            total += r * (n + m)
        else:
            total += n * m
    return total


def topk_values(numel: int, ratio: float) -> int:
    """Values top-k keeps of ``numel`` (at least one)."""
    return max(1, int(numel * ratio))

