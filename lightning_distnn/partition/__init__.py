"""Partitioners: data (samples over data-parallel ranks, features over feature-parallel ranks) and
model (layers over pipeline stages)."""

from lightning_distnn.partition.data import (
    PARTITIONERS,
    ContiguousPartitioner,
    KMeansLocalPartitioner,
    KMeansPartitioner,
    PartitionReport,
    Partitioner,
    RandomPartitioner,
    StratifiedPartitioner,
    dataset_features,
    dataset_labels,
    kmeans,
    make_partitioner,
    partition_report,
)
from lightning_distnn.partition.features import (
    FEATURE_PARTITIONERS,
    FeaturePlan,
    FeatureSlice,
    FeatureSliceDataset,
    channel_groups,
    column_groups,
    image_strips,
    make_feature_plan,
)

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "RandomPartitioner",
    "ContiguousPartitioner",
    "StratifiedPartitioner",
    "KMeansPartitioner",
    "KMeansLocalPartitioner",
    "PartitionReport",
    "make_partitioner",
    "partition_report",
    "dataset_labels",
    "dataset_features",
    "kmeans",
    "FEATURE_PARTITIONERS",
    "FeaturePlan",
    "FeatureSlice",
    "FeatureSliceDataset",
    "image_strips",
    "channel_groups",
    "column_groups",
    "make_feature_plan",
]
