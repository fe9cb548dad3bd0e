"""The partition report: per-rank shard sizes, label histograms and divergence from the global
label distribution (logged by the data modules at the start of fit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from lightning_distnn.partition.clustering import dataset_labels

if TYPE_CHECKING:
    from lightning_distnn.partition.data import Partitioner


@dataclass
class ShardStats:
    rank: int
    size: int
    unique: int
    histogram: list[int]
    tv_distance: float  # total-variation distance of the shard's label distribution to the global one


@dataclass
class PartitionReport:
    """Per-rank shard sizes, label histograms and divergence from the global label distribution."""

    partitioner: str
    num_replicas: int
    epoch: int
    global_histogram: list[int]
    rows: list[ShardStats] = field(default_factory=list)

    @property
    def size_spread(self) -> int:
        """Largest minus smallest exact shard size (0 or 1 by construction)."""
        sizes = [r.unique for r in self.rows]
        return max(sizes) - min(sizes)

    @property
    def max_tv_distance(self) -> float:
        return max(r.tv_distance for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"partition={self.partitioner} ranks={self.num_replicas} epoch={self.epoch} "
            f"global labels={self.global_histogram}",
            "| rank | iterated | unique | label histogram | TV distance |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.rank} | {r.size} | {r.unique} | {r.histogram} | {r.tv_distance:.4f} |")
        return "\n".join(lines)


def partition_report(
    sampler: "Partitioner", labels: Optional[torch.Tensor] = None, epoch: Optional[int] = None
) -> PartitionReport:
    """Describe every rank's shard of ``epoch`` (computed locally: the partition is a pure function)."""
    epoch = sampler.epoch if epoch is None else epoch
    y = dataset_labels(sampler.dataset) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    num_classes = int(y.max().item()) + 1 if len(y) else 0
    global_hist = torch.bincount(y, minlength=num_classes).double()
    p_global = global_hist / global_hist.sum()
    exact = sampler.assign(epoch)
    rows = []
    for r, shard in enumerate(sampler.shards(epoch)):
        idx = torch.as_tensor(exact[r], dtype=torch.long)
        hist = torch.bincount(y[idx], minlength=num_classes).double() if len(idx) else torch.zeros(num_classes)
        tv = 0.5 * (hist / hist.sum().clamp(min=1) - p_global).abs().sum().item() if len(idx) else 1.0
        rows.append(ShardStats(r, len(shard), len(idx), [int(v) for v in hist.tolist()], tv))
    return PartitionReport(sampler.name, sampler.num_replicas, epoch, [int(v) for v in global_hist.tolist()], rows)
