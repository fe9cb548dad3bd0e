"""Parallel degrees of a run and the named DeviceMesh built from them.

Every strategy reads its ranks and process groups from one :class:`ParallelDims`; nobody
recomputes ``rank // tp`` by hand. The mesh axes are always ordered ``("dp", "pp", "tp")``:
``tp`` is the innermost axis (neighbouring ranks), ``dp`` the outermost.

Words: *axis* is a mesh axis, *dim* a tensor dimension.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

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

    def build_mesh(self, device_type: str = "cpu"):
        """Build (once) and return the 3-D DeviceMesh with axes ``("dp", "pp", "tp")``.

        Needs an initialised default process group whose size is ``world_size``.
        """
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if dist.is_initialized() and dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"ParallelDims was built for world_size={self.world_size}, but the process group has "
                    f"{dist.get_world_size()} ranks: pass the same number of processes to the Trainer."
                )
            self._mesh = init_device_mesh(
                device_type, (self.dp, self.pp, self.tp), mesh_dim_names=tuple(a.value for a in AXES)
            )
        return self._mesh

    def group(self, axis: str, device_type: str = "cpu") -> "dist.ProcessGroup":
        """The process group of this rank along one mesh axis."""
        if axis not in self.degrees:
            raise ValueError(f"Unknown mesh axis {axis!r}; valid axes: {', '.join(self.degrees)}.")
        return self.build_mesh(device_type).get_group(axis)


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
