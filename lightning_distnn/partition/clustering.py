"""What the label- and feature-aware partitioners read from a dataset: labels, small feature
vectors, and k-means over them (computed on rank 0 and broadcast by the partitioners)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The integer labels of a dataset, cheaply where possible.

    Fast paths: ``TensorDataset`` (its second tensor), ``Subset`` of those, and datasets with a
    ``targets`` or ``labels`` attribute (torchvision, :class:`SQLiteDataset`, :class:`ImageFolderDataset`).
    Otherwise every item is read and its second element taken.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise ValueError("TensorDataset has no label tensor: a label-aware partitioner needs (x, y) samples.")
        return dataset.tensors[1].long().reshape(-1)
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return torch.as_tensor(value, dtype=torch.long).reshape(-1)
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                f"{type(dataset).__name__}[{i}] is a {type(item).__name__}, not an (input, label) pair: stratified "
                "partitioning needs labels. Give the dataset a `targets` attribute, pass labels=[...] (one per "
                "sample; make_partitioner and partition_options take it too), or use partition=random/contiguous."
            )
        labels.append(int(item[1]))
    return torch.tensor(labels, dtype=torch.long)


def dataset_features(dataset: Dataset, max_side: int = 8) -> torch.Tensor:
    """The inputs as a float matrix ``(n, d)`` for clustering; images are average-pooled to ``max_side``."""
    if isinstance(dataset, Subset):
        return dataset_features(dataset.dataset, max_side)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        x = dataset.tensors[0]
    elif callable(getattr(dataset, "all_inputs", None)):
        x = dataset.all_inputs()
    else:
        first = dataset[0]
        if not isinstance(first, (tuple, list)) or not isinstance(first[0], (torch.Tensor, int, float, list)):
            raise ValueError(
                f"{type(dataset).__name__}[0] is a {type(first).__name__}, not an (input, ...) tuple whose first "
                "element is the input: k-means partitioning clusters the inputs. Pass features=... (an (n, d) tensor, "
                "one row per sample; make_partitioner and partition_options take it too), give the dataset an "
                "all_inputs() method, or use partition=random/contiguous/stratified."
            )
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
    x = x.float()
    if x.dim() == 4 and max(x.shape[-2:]) > max_side:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], max_side), min(x.shape[-1], max_side)))
    return x.reshape(len(x), -1)


# ---------------------------------------------------------------------------- k-means
def kmeans(features: torch.Tensor, num_clusters: int, *, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """Cluster ids ``(n,)`` of a seeded k-means (k-means++ start, Lloyd iterations), in pure torch.

    Cluster ids are renumbered by first appearance so the result does not depend on the start.
    """
    n = len(features)
    if not 1 <= num_clusters <= n:
        raise ValueError(
            f"num_clusters={num_clusters} must be between 1 and the number of samples ({n}): "
            "lower partition_options.num_clusters."
        )
    x = features.double()
    g = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(n, (1,), generator=g).item()]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, num_clusters):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than clusters: take any not yet chosen
            i = torch.randint(n, (1,), generator=g).item()
        else:
            i = torch.multinomial(d2 / total, 1, generator=g).item()
        centroids.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centroids)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    # renumber by first appearance: stable ids
    order: dict[int, int] = {}
    for a in assign.tolist():
        order.setdefault(a, len(order))
    return torch.tensor([order[a] for a in assign.tolist()], dtype=torch.long)


# ---------------------------------------------------------------------------- samplers
