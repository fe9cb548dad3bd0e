"""Vertical (feature) partitioners: which slice of every sample's features each rank owns.

A feature plan is plain data: one :class:`FeatureSlice` per rank (a ``narrow`` along one sample
dimension) in a :class:`FeaturePlan` that prints as a table and checks that the slices tile the
features exactly once.

=============  =========================================================
name           slice of rank ``r`` for ``P`` parts
=============  =========================================================
strips_h       horizontal strips of an image ``(C, H, W)``: rows
strips_w       vertical strips: columns
channels       channel groups
columns        column groups of tabular samples ``(F,)``
=============  =========================================================

Slices differ in size by at most one (the first ``size % P`` are longer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class FeatureSlice:
    """Rank ``rank`` owns ``sample[..., start:stop, ...]`` along sample dimension ``dim`` (0 = first dim of a sample)."""

    rank: int
    dim: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def take(self, x: torch.Tensor, *, batched: bool = True) -> torch.Tensor:
        """The slice of a batch ``(B, *sample_shape)`` (or of one sample with ``batched=False``)."""
        return x.narrow(self.dim + (1 if batched else 0), self.start, self.length)

    def shape_of(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(sample_shape)
        shape[self.dim] = self.length
        return tuple(shape)


@dataclass(frozen=True)
class FeaturePlan:
    """One :class:`FeatureSlice` per rank over samples of ``sample_shape``."""

    kind: str
    sample_shape: tuple[int, ...]
    slices: tuple[FeatureSlice, ...]

    def __post_init__(self) -> None:
        covered = sorted((s.start, s.stop) for s in self.slices)
        dims = {s.dim for s in self.slices}
        if len(dims) != 1:
            raise ValueError(f"a feature plan slices one dimension, got dims {sorted(dims)}")
        (dim,) = dims
        edge = 0
        for start, stop in covered:
            if start != edge or stop <= start:
                raise ValueError(f"feature slices {covered} do not tile [0, {self.sample_shape[dim]}) exactly once")
            edge = stop
        if edge != self.sample_shape[dim]:
            raise ValueError(f"feature slices {covered} cover [0, {edge}) of a dimension of size {self.sample_shape[dim]}")

    @property
    def parts(self) -> int:
        return len(self.slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, rank: int) -> FeatureSlice:
        return self.slices[rank]

    def __iter__(self):
        return iter(self.slices)

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [s.shape_of(self.sample_shape) for s in self.slices]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slice of a batch."""
        return [s.take(x) for s in self.slices]

    def __str__(self) -> str:
        lines = [
            f"feature plan {self.kind} over samples {tuple(self.sample_shape)}",
            "| rank | dim | range | slice shape |",
            "|---|---|---|---|",
        ]
        for s in self.slices:
            lines.append(f"| {s.rank} | {s.dim} | [{s.start}, {s.stop}) | {s.shape_of(self.sample_shape)} |")
        return "\n".join(lines)


def _even(size: int, parts: int, what: str, fix: str) -> list[tuple[int, int]]:
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} must be a positive integer (one feature slice per rank).")
    if parts > size:
        raise ValueError(f"cannot split {size} {what} into {parts} parts: {fix}")
    base, extra = divmod(size, parts)
    out, start = [], 0
    for r in range(parts):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _image_shape(sample_shape: Sequence[int], kind: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3:
        raise ValueError(f"{kind} splits images (C, H, W); got sample shape {shape}. Use 'columns' for tabular data.")
    return shape  # type: ignore[return-value]


def image_strips(sample_shape: Sequence[int], parts: int, *, axis: str = "h") -> FeaturePlan:
    """Horizontal (``axis="h"``: rows) or vertical (``"w"``: columns) strips of ``(C, H, W)`` images."""
    if axis not in ("h", "w"):
        raise ValueError(f"axis={axis!r}: use 'h' (rows) or 'w' (columns).")
    kind = f"strips_{axis}"
    shape = _image_shape(sample_shape, kind)
    dim = 1 if axis == "h" else 2
    ranges = _even(shape[dim], parts, "rows" if axis == "h" else "columns", "use fewer ranks or larger images.")
    return FeaturePlan(kind, shape, tuple(FeatureSlice(r, dim, a, b) for r, (a, b) in enumerate(ranges)))


def channel_groups(sample_shape: Sequence[int], parts: int) -> FeaturePlan:
    """Channel groups of ``(C, H, W)`` images."""
    shape = _image_shape(sample_shape, "channels")
    ranges = _even(shape[0], parts, "channels", "use strips_h/strips_w, or fewer ranks.")
    return FeaturePlan("channels", shape, tuple(FeatureSlice(r, 0, a, b) for r, (a, b) in enumerate(ranges)))


def column_groups(num_features: int | Sequence[int], parts: int) -> FeaturePlan:
    """Column groups of tabular samples ``(F,)``."""
    shape = (int(num_features),) if isinstance(num_features, int) else tuple(int(s) for s in num_features)
    if len(shape) != 1:
        raise ValueError(f"columns splits tabular samples (F,); got sample shape {shape}.")
    ranges = _even(shape[0], parts, "columns", "use fewer ranks.")
    return FeaturePlan("columns", shape, tuple(FeatureSlice(r, 0, a, b) for r, (a, b) in enumerate(ranges)))


FEATURE_PARTITIONERS = {
    "strips_h": lambda shape, parts: image_strips(shape, parts, axis="h"),
    "strips_w": lambda shape, parts: image_strips(shape, parts, axis="w"),
    "channels": channel_groups,
    "columns": column_groups,
}


def make_feature_plan(name: str, sample_shape: Sequence[int] | int, parts: int) -> FeaturePlan:
    """A feature plan by name; unknown names list the valid ones."""
    if name not in FEATURE_PARTITIONERS:
        raise ValueError(
            f"Unknown feature partition {name!r}. Valid: {', '.join(FEATURE_PARTITIONERS)}. "
            "Images: strips_h/strips_w/channels; tabular: columns."
        )
    shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
    return FEATURE_PARTITIONERS[name](shape, parts)


class FeatureSliceDataset(Dataset):
    """A dataset whose inputs are cut to one rank's :class:`FeatureSlice` (labels unchanged)."""

    def __init__(self, dataset: Dataset, feature_slice: FeatureSlice) -> None:
        self.dataset = dataset
        self.feature_slice = feature_slice

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _cut(self, item: Any) -> Any:
        x, *rest = item
        return (self.feature_slice.take(torch.as_tensor(x), batched=False).contiguous(), *rest)

    def __getitem__(self, index: int) -> Any:
        return self._cut(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if callable(getitems) else [self.dataset[i] for i in indices]
        return [self._cut(item) for item in items]

    def __getattr__(self, name: str) -> Any:  # targets, labels, ... of the wrapped dataset
        if name in ("dataset", "feature_slice"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
