"""Parallel degrees of a run and the named DeviceMesh built from them.

Every strategy reads its ranks and process groups from one :class:`ParallelDims`; nobody
recomputes ``rank // tp`` by hand. The mesh axes are always ordered ``("dp", "pp", "tp")``:
``tp`` is the innermost axis (neighbouring ranks), ``dp`` the outermost.

Words: *axis* is a mesh axis, *dim* a tensor dimension.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist


class Axis(str, enum.Enum):
    """Names of the mesh axes."""

    DP = "dp"
    PP = "pp"
    TP = "tp"


AXES: tuple[Axis, ...] = (Axis.DP, Axis.PP, Axis.TP)


@dataclass
class ParallelDims:
    """Data-, pipeline- and tensor-parallel degrees that multiply to the world size.

    One degree may be ``-1``: it takes whatever the others leave ("the rest").

    >>> ParallelDims(dp=-1, pp=2, tp=1, world_size=8).dp
    4
    """

    dp: int = -1
    pp: int = 1
    tp: int = 1
    world_size: int = 1
    _mesh: Optional[object] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        degrees = {"dp": self.dp, "pp": self.pp, "tp": self.tp}
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size={self.world_size!r} must be a positive integer (devices x nodes).")
        for name, value in degrees.items():
            if not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(
                    f"{name}={value!r} is not a parallel degree: use a positive integer, or -1 for 'the rest'."
                )
        free = [name for name, value in degrees.items() if value == -1]
        if len(free) > 1:
            raise ValueError(
                f"Only one parallel degree may be -1 ('the rest'), got {', '.join(f'{n}=-1' for n in free)}: "
                "set all but one of them to a number."
            )
        fixed = 1
        for name, value in degrees.items():
            if value != -1:
                fixed *= value
        if free:
            if self.world_size % fixed:
                raise ValueError(
                    f"{self._describe()} does not fit world_size={self.world_size}: the fixed degrees multiply to "
                    f"{fixed}, which does not divide {self.world_size}. Change the degrees or use "
                    f"a world size that is a multiple of {fixed} (devices x num_nodes)."
                )
            setattr(self, free[0], self.world_size // fixed)
        elif fixed != self.world_size:
            raise ValueError(
                f"{self._describe()} multiplies to {fixed}, but the run has world_size={self.world_size} "
                f"processes (devices x num_nodes). Make dp*pp*tp equal {self.world_size}, e.g. "
                f"dp={max(self.world_size // (self.pp * self.tp), 1)} if {self.pp * self.tp} divides it, or set "
                f"Trainer(devices=...) to {fixed} processes."
            )

    def _describe(self) -> str:
        return f"dp={self.dp}, pp={self.pp}, tp={self.tp}"

    @property
    def degrees(self) -> dict[str, int]:
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp}

    @property
    def enabled_axes(self) -> list[str]:
        return [name for name, value in self.degrees.items() if value > 1]

    def coordinates(self, rank: int) -> dict[str, int]:
        """Position of a global rank on each axis (dp outermost, tp innermost)."""
        return {
            "dp": rank // (self.pp * self.tp),
            "pp": (rank // self.tp) % self.pp,
            "tp": rank % self.tp,
        }

    def build_mesh(self, device_type: str = "cpu", *, timeout: Optional[timedelta] = None):
        """Build (once) and return the 3-D DeviceMesh with axes ``("dp", "pp", "tp")``.

        Needs an initialised default process group whose size is ``world_size``. Every group of
        every axis is created here with ``timeout`` (default: the default group's), so a collective
        on a sub-mesh group (e.g. the dp peers of one pipeline stage) ends after the same time as
        one on the whole world: ``init_device_mesh`` would give its sub-groups torch's default
        (30 minutes on gloo), and a frozen peer would hang the job that long.
        """
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            if dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"ParallelDims was built for world_size={self.world_size}, but the process group has "
                    f"{dist.get_world_size()} ranks: pass the same number of processes to the Trainer."
                )
            ranks = torch.arange(self.world_size, dtype=torch.int).view(self.dp, self.pp, self.tp)
            groups = []
            for axis in range(3):
                # every rank creates every group of this axis, in the same order (a torch.distributed rule)
                moved = ranks.movedim(axis, -1).reshape(-1, ranks.shape[axis])
                mine = None
                for row in moved.tolist():
                    group = dist.new_group(row, timeout=timeout)
                    if dist.get_rank() in row:
                        mine = group
                groups.append(mine)
            self._mesh = DeviceMesh.from_group(
                groups, device_type, mesh=ranks, mesh_dim_names=tuple(a.value for a in AXES)
            )
        return self._mesh

    @property
    def mesh(self):
        """The mesh built by :meth:`build_mesh` (a ``RuntimeError`` before it)."""
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not run yet in this process (the strategy builds it in setup_environment).")
        return self._mesh

    def group(self, axis: Union[str, Axis]) -> "dist.ProcessGroup":
        """The process group of this rank along one mesh axis (after :meth:`build_mesh`)."""
        name = Axis(axis).value if not isinstance(axis, Axis) else axis.value
        return self.mesh.get_group(name)

    def rank_on(self, axis: Union[str, Axis], rank: Optional[int] = None) -> int:
        """This (or ``rank``'s) position on one axis."""
        rank = dist.get_rank() if rank is None else rank
        return self.coordinates(rank)[Axis(axis).value]

    def __str__(self) -> str:
        return " x ".join(f"{name}{value}" for name, value in self.degrees.items() if value > 1) or "one process"


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
