"""Horizontal data partitioners: which samples each data-parallel rank reads, epoch by epoch.

Each partitioner is a :class:`torch.utils.data.DistributedSampler` subclass, so Lightning keeps it
as it is (it only injects its own sampler into loaders whose sampler is not one) and calls its
``set_epoch`` every epoch. The ``num_replicas``/``rank`` come from the strategy's
``distributed_sampler_kwargs`` (the data-parallel group), see ``ImageDataModule.partition``.

=============  ==============================================================================
name           shard of rank ``r`` (``R`` ranks, ``n`` samples)
=============  ==============================================================================
random         ``perm[r::R]`` of a seeded permutation drawn again each epoch; identical to
               torch's ``DistributedSampler(shuffle=True, seed=seed)``
contiguous     the ``r``-th block of ``range(n)`` (blocks differ by at most one sample)
stratified     every class dealt round-robin: each shard holds ``n_c / R`` (+-1) of class ``c``
kmeans         k-means clusters over the features, each cluster dealt round-robin (balanced, IID-like)
kmeans_local   whole clusters per rank, in cluster order (non-IID shards for skew studies); a
               cluster that straddles a block boundary is split so shard sizes stay within one
=============  ==============================================================================

Rules shared by all of them:

* :meth:`Partitioner.assign` is the exact partition: every sample once, shard sizes differ by
  at most one.
* The iterated shards follow torch's rule so that every rank runs the same number of steps
  (collectives never wait for a rank that has finished): ``drop_last=False`` pads each short
  shard with one repeated sample of its own shard (``ceil(n/R)`` each), ``drop_last=True`` drops
  the last sample of each long shard (``floor(n/R)`` each).
* Anything random (the seed, the cluster assignment) is computed on rank 0 and broadcast
  (:mod:`lightning_distnn.sync`), never assumed equal.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from lightning_distnn import sync
from lightning_distnn.partition.clustering import dataset_features, dataset_labels, kmeans
from lightning_distnn.partition.report import PartitionReport, partition_report  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- dataset access
def _deal(groups: Sequence[list[int]], num_replicas: int) -> list[list[int]]:
    """Concatenate the groups and deal the result round-robin: each rank gets n_g/R (+-1) of every group."""
    flat = [i for g in groups for i in g]
    return [flat[r::num_replicas] for r in range(num_replicas)]


def _blocks(order: list[int], num_replicas: int) -> list[list[int]]:
    """Contiguous blocks of ``order``, sizes differ by at most one (the first ``n % R`` blocks are longer)."""
    n = len(order)
    base, extra = divmod(n, num_replicas)
    out, start = [], 0
    for r in range(num_replicas):
        size = base + (1 if r < extra else 0)
        out.append(order[start : start + size])
        start += size
    return out


class Partitioner(DistributedSampler):
    """Base class: subclasses implement :meth:`assign` (the exact partition of one epoch).

    Args:
        dataset: the training set.
        num_replicas, rank: the data-parallel group size and this rank's place in it (default: the
            default process group, or 1/0 without one).
        shuffle: reshuffle every epoch (seeded ``seed + epoch``); the partition itself stays fixed
            for ``contiguous``/``kmeans_local`` and is redrawn for the others.
        seed: base seed. With a process group it is taken from rank 0 (``sync=True``).
        drop_last: drop instead of pad to equal shard sizes (see the module docstring).
        sync: agree the seed (and the cluster assignment) across ranks by broadcast.
    """

    name = "base"

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        sync_ranks: bool = True,
    ) -> None:
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if sync.is_distributed() else 1
        if rank is None:
            rank = torch.distributed.get_rank() if sync.is_distributed() else 0
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r} must be a positive integer (the data-parallel size).")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}.")
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"{type(self).__name__}: the dataset is empty; there is nothing to partition.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.sync_ranks = sync_ranks
        if sync_ranks and sync.is_distributed():
            self.seed = sync.agree_seed(int(seed))
        self.n = n

    # -- the partition
    def assign(self, epoch: int = 0) -> list[list[int]]:
        """The exact partition of ``range(n)`` for ``epoch``: one list of indices per rank."""
        raise NotImplementedError

    def _generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(sync.epoch_seed(self.seed, epoch) + 1_000_003 * salt)

    def _maybe_shuffle(self, indices: list[int], epoch: int, salt: int) -> list[int]:
        if not self.shuffle or len(indices) < 2:
            return sorted(indices)
        perm = torch.randperm(len(indices), generator=self._generator(epoch, salt)).tolist()
        return [indices[p] for p in perm]

    def shards(self, epoch: Optional[int] = None) -> list[list[int]]:
        """What each rank iterates in ``epoch``: :meth:`assign` made equal-sized by the pad/drop rule."""
        epoch = self.epoch if epoch is None else epoch
        parts = self.assign(epoch)
        target = self.num_samples
        flat = [i for p in parts for i in p]
        out = []
        for r, part in enumerate(parts):
            if len(part) > target:
                part = part[:target]
            elif len(part) < target:
                source = part if part else flat
                need = target - len(part)
                part = part + [source[(r + k) % len(source)] for k in range(need)]
            out.append(part)
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.shards(self.epoch)[self.rank])

    def __len__(self) -> int:
        return self.num_samples

    def report(self, labels: Optional[torch.Tensor] = None, epoch: Optional[int] = None) -> "PartitionReport":
        """A :class:`PartitionReport` of ``epoch`` (labels default to the dataset's)."""
        return partition_report(self, labels=labels, epoch=epoch)


class RandomPartitioner(Partitioner):
    """A seeded permutation per epoch, rank ``r`` takes every ``R``-th sample (torch's rule, bit for bit)."""

    name = "random"

    def _order(self, epoch: int) -> list[int]:
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(sync.epoch_seed(self.seed, epoch))).tolist()
        return list(range(self.n))

    def assign(self, epoch: int = 0) -> list[list[int]]:
        order = self._order(epoch)
        return [order[r :: self.num_replicas] for r in range(self.num_replicas)]

    def shards(self, epoch: Optional[int] = None) -> list[list[int]]:
        # torch's DistributedSampler: pad the permutation with its own head, or cut its tail, then stride
        epoch = self.epoch if epoch is None else epoch
        order = self._order(epoch)
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            order = order + (order * math.ceil(pad / len(order)))[:pad] if pad else order
        return [order[r : self.total_size : self.num_replicas] for r in range(self.num_replicas)]


class ContiguousPartitioner(Partitioner):
    """Rank ``r`` holds the ``r``-th contiguous block of the dataset (its order shuffled per epoch)."""

    name = "contiguous"

    def assign(self, epoch: int = 0) -> list[list[int]]:
        blocks = _blocks(list(range(self.n)), self.num_replicas)
        return [self._maybe_shuffle(b, epoch, salt=r + 1) for r, b in enumerate(blocks)]


class _GroupPartitioner(Partitioner):
    """Partitioners driven by a group id per sample (label or cluster)."""

    def group_ids(self) -> torch.Tensor:
        raise NotImplementedError

    def _groups(self, epoch: int) -> list[list[int]]:
        ids = self.group_ids()
        groups = []
        for g in torch.unique(ids).tolist():
            members = torch.nonzero(ids == g).flatten().tolist()
            groups.append(self._maybe_shuffle(members, epoch, salt=10_000 + int(g)))
        return groups

    def assign(self, epoch: int = 0) -> list[list[int]]:
        dealt = _deal(self._groups(epoch), self.num_replicas)
        return [self._maybe_shuffle(s, epoch, salt=r + 1) for r, s in enumerate(dealt)]


class StratifiedPartitioner(_GroupPartitioner):
    """Every class dealt round-robin: each shard keeps the global label proportions (+-1 sample per class).

    Args:
        labels: the labels (default: read from the dataset, see :func:`dataset_labels`).
    """

    name = "stratified"

    def __init__(self, dataset: Dataset, *args: Any, labels: Optional[Sequence[int]] = None, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        y = dataset_labels(dataset) if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(y) != self.n:
            raise ValueError(f"labels has {len(y)} entries but the dataset has {self.n} samples.")
        self.labels = y

    def group_ids(self) -> torch.Tensor:
        return self.labels


class KMeansPartitioner(_GroupPartitioner):
    """k-means over the samples' features; each cluster is spread evenly over the ranks (balanced shards).

    The clustering runs once, on rank 0, and its assignment is broadcast.

    Args:
        num_clusters: k (default 10).
        features: an ``(n, d)`` matrix to cluster (default: the inputs, images pooled to 8x8).
        kmeans_iters: Lloyd iterations at most.
    """

    name = "kmeans"
    default_clusters: Optional[int] = 10

    def __init__(
        self,
        dataset: Dataset,
        *args: Any,
        num_clusters: Optional[int] = None,
        features: Optional[torch.Tensor] = None,
        kmeans_iters: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        k = num_clusters or self.default_clusters or self.num_replicas
        k = min(int(k), self.n)
        if k < 1:
            raise ValueError(f"num_clusters={num_clusters!r} must be a positive integer.")
        self.num_clusters = k

        def cluster() -> torch.Tensor:
            x = dataset_features(dataset) if features is None else torch.as_tensor(features).reshape(self.n, -1)
            return kmeans(x, k, seed=self.seed, iters=kmeans_iters)

        self.clusters = sync.compute_once(cluster) if self.sync_ranks else cluster()

    def group_ids(self) -> torch.Tensor:
        return self.clusters


class KMeansLocalPartitioner(KMeansPartitioner):
    """Whole k-means clusters per rank (non-IID): clusters in id order, cut into equal contiguous blocks.

    ``num_clusters`` defaults to the number of ranks. At most ``R - 1`` clusters are split between two
    neighbouring ranks, which keeps the shard sizes within one sample.
    """

    name = "kmeans_local"
    default_clusters = None

    def assign(self, epoch: int = 0) -> list[list[int]]:
        order = [i for g in self._groups(epoch) for i in g]
        blocks = _blocks(order, self.num_replicas)
        return [self._maybe_shuffle(b, epoch, salt=r + 1) for r, b in enumerate(blocks)]


PARTITIONERS: dict[str, type[Partitioner]] = {
    cls.name: cls
    for cls in (RandomPartitioner, ContiguousPartitioner, StratifiedPartitioner, KMeansPartitioner, KMeansLocalPartitioner)
}


def make_partitioner(
    name: str,
    dataset: Dataset,
    *,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    sync_ranks: bool = True,
    **options: Any,
) -> Partitioner:
    """A partitioner by name (``data.partition=...``); ``options`` are its own arguments (e.g. ``num_clusters``)."""
    key = str(name).lower()
    if key not in PARTITIONERS:
        raise ValueError(
            f"Unknown partition={name!r}. Valid partitioners: {', '.join(PARTITIONERS)}. "
            "Set e.g. data.partition=stratified."
        )
    cls = PARTITIONERS[key]
    allowed = {
        StratifiedPartitioner: {"labels"},
        KMeansPartitioner: {"num_clusters", "features", "kmeans_iters"},
        KMeansLocalPartitioner: {"num_clusters", "features", "kmeans_iters"},
    }.get(cls, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"partition={key!r} takes no option(s) {unknown}; its options are: {sorted(allowed) or 'none'}. "
            "Remove them from data.partition_options."
        )
    return cls(
        dataset,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        sync_ranks=sync_ranks,
        **options,
    )
