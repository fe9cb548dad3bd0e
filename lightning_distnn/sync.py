"""Compute once, broadcast: what every rank must agree on (epoch seed, partition, cluster assignment).

A value that steers the data (the sampler's seed, a k-means cluster assignment, a partition) is
never *assumed* to be equal on every rank: it is computed on one rank (``src``, default 0) and
broadcast, so a rank that was started with another seed, another library version or another
random state still follows rank 0. :func:`check_agreement` proves it afterwards (a hash of the
value is all-gathered and compared).

Every helper works without a process group (one process): it then returns its input.
Collectives use the process group's timeout (the strategies' ``timeout`` argument), so a dead
rank ends the job with an error instead of a hang.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: T, *, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> T:
    """Rank ``src``'s ``obj`` on every rank of ``group`` (the default group when None).

    ``src`` is a global rank, as in :func:`torch.distributed.broadcast_object_list`.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, *, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank; shape and dtype travel first, so other ranks may pass anything."""
    if not is_distributed():
        return tensor
    meta = broadcast_object((tuple(tensor.shape), tensor.dtype), src=src, group=group)
    out = tensor.contiguous() if dist.get_rank() == src else torch.empty(meta[0], dtype=meta[1])
    dist.broadcast(out, src=src, group=group)
    return out


def compute_once(fn: Callable[[], T], *, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> T:
    """Run ``fn()`` on rank ``src`` only and broadcast its result (tensors or picklable objects)."""
    if not is_distributed():
        return fn()
    value = fn() if dist.get_rank() == src else None
    # tensors travel as tensors (no pickling of large data): the kind is broadcast first
    if broadcast_object(isinstance(value, torch.Tensor), src=src, group=group):
        return broadcast_tensor(value if value is not None else torch.empty(0), src=src, group=group)
    return broadcast_object(value, src=src, group=group)


def agree_seed(seed: Optional[int], *, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> int:
    """The seed of rank ``src`` on every rank (``None`` there draws a fresh one from the OS)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(_os_entropy())).item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed={seed!r} must be an int (or None for a fresh seed agreed from rank {src}).")
    return int(broadcast_object(int(seed), src=src, group=group))


def _os_entropy() -> int:
    import os

    return int.from_bytes(os.urandom(4), "little")


def epoch_seed(base_seed: int, epoch: int) -> int:
    """The seed of one epoch: ``base_seed + epoch`` (the rule of torch's DistributedSampler)."""
    return int(base_seed) + int(epoch)


def fingerprint(obj: Any) -> str:
    """A short, stable hash of tensors, lists of ints and other picklable values."""
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str((tuple(obj.shape), obj.dtype)).encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, (list, tuple)) and all(isinstance(v, (list, tuple, torch.Tensor)) for v in obj):
        for item in obj:
            h.update(fingerprint(item).encode())
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        h.update(buffer.getvalue())
    return h.hexdigest()[:16]


def gather_fingerprints(obj: Any, *, group: Optional[dist.ProcessGroup] = None) -> list[str]:
    """Every rank's :func:`fingerprint` of ``obj`` (one entry without a process group)."""
    mine = fingerprint(obj)
    if not is_distributed():
        return [mine]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def check_agreement(obj: Any, what: str, *, group: Optional[dist.ProcessGroup] = None) -> str:
    """Raise ``RuntimeError`` naming the ranks whose ``obj`` differs from rank 0's; returns the fingerprint."""
    prints = gather_fingerprints(obj, group=group)
    bad = [r for r, p in enumerate(prints) if p != prints[0]]
    if bad:
        raise RuntimeError(
            f"ranks disagree on {what}: ranks {bad} differ from rank 0 (fingerprints {prints}). "
            "Compute the value once and broadcast it (lightning_distnn.sync.compute_once / broadcast_object) "
            "instead of computing it on every rank."
        )
    return prints[0]
