"""Every process group of a DeviceMesh with the configured timeout (torch leaves sub-mesh groups at its default)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

log = logging.getLogger(__name__)


def set_mesh_timeout(mesh, timeout: timedelta | float) -> None:
    """Give every process group of ``mesh`` (one per mesh axis) the collective ``timeout``.

    torch 2.14's ``DeviceMesh`` creates its per-axis groups with ``new_group(ranks, timeout=None)``
    unless a ``backend_override`` carries options, so they get torch's default (30 min for gloo, 10 for
    NCCL), not the world group's timeout: a frozen rank then hangs a sub-mesh collective for 30 minutes.
    ``dist.set_timeout`` changes a group's timeout for every later operation.
    """
    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    names = mesh.mesh_dim_names or tuple(range(mesh.ndim))
    seen = set()
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if id(group) in seen or group == dist.GroupMember.NON_GROUP_MEMBER:
            continue
        seen.add(id(group))
        dist.set_timeout(timeout, group)
        log.debug("mesh axis %s: timeout %s", names[dim], timeout)


def build_mesh_with_timeout(
    device_type: str, shape: Sequence[int], names: Sequence[str], *, timeout: timedelta | float
):
    """``init_device_mesh(device_type, shape, mesh_dim_names=names)`` whose every group has ``timeout``.

    Also sets it on the default group. Flattened or sliced meshes made later from this one create new
    groups: pass those through :func:`set_mesh_timeout` too.
    """
    from torch.distributed.device_mesh import init_device_mesh

    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout={timeout} must be positive, e.g. timeout=60 (seconds).")
    mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
    dist.set_timeout(timeout)
    set_mesh_timeout(mesh, timeout)
    return mesh
