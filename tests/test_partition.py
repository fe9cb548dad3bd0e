"""Horizontal and vertical partitioners: coverage, disjointness, balance (hypothesis), errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_distnn.partition import (
    PARTITIONERS,
    FeatureSliceDataset,
    image_strips,
    make_feature_plan,
    make_partitioner,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def datasets(draw):
    n = draw(st.integers(1, 120))
    num_replicas = draw(st.integers(1, 10))
    num_classes = draw(st.integers(1, 6))
    # skewed label distributions: class weights from 0..5
    weights = draw(st.lists(st.integers(0, 5), min_size=num_classes, max_size=num_classes).filter(any))
    pool = [c for c, w in enumerate(weights) for _ in range(w)]
    labels = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**20))
    return n, num_replicas, torch.tensor(labels), seed


def _dataset(n, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    # features follow the labels a little, so k-means has structure to find
    x = torch.randn(n, 4, generator=g) + labels.float().unsqueeze(1)
    return TensorDataset(x, labels)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@SETTINGS
@given(data=datasets(), epoch=st.integers(0, 3), drop_last=st.booleans())
def test_partition_covers_disjoint_balanced(name, data, epoch, drop_last):
    n, num_replicas, labels, seed = data
    ds = _dataset(n, labels, seed)
    options = {"num_clusters": min(3, n)} if name == "kmeans" else {}
    samplers = [
        make_partitioner(name, ds, num_replicas=num_replicas, rank=r, seed=seed, drop_last=drop_last, **options)
        for r in range(num_replicas)
    ]
    exact = samplers[0].assign(epoch)
    # coverage and disjointness of the exact partition: every sample exactly once
    flat = [i for shard in exact for i in shard]
    assert sorted(flat) == list(range(n))
    sizes = [len(s) for s in exact]
    assert max(sizes) - min(sizes) <= 1
    # what ranks iterate: equal sizes (no rank waits for another), the explicit pad/drop rule
    for r, sampler in enumerate(samplers):
        sampler.set_epoch(epoch)
        shard = list(sampler)
        assert len(shard) == len(sampler) == (n // num_replicas if drop_last and n % num_replicas else -(-n // num_replicas))
        assert shard == samplers[0].shards(epoch)[r]  # every rank computes the same partition
        if drop_last:
            assert set(shard) <= set(exact[r])
        else:
            assert set(exact[r]) <= set(shard) and len(shard) - len(exact[r]) <= 1
            if name != "random" and exact[r]:  # random pads with the permutation's head, as torch does
                assert set(shard) == set(exact[r])  # padding repeats a sample of the rank's own shard
    if drop_last:
        dropped = n - sum(len(list(s)) for s in samplers)
        assert 0 <= dropped < num_replicas
    if name == "stratified":
        for c in torch.unique(labels).tolist():
            n_c = int((labels == c).sum())
            for shard in exact:
                count = int((labels[torch.tensor(shard, dtype=torch.long)] == c).sum()) if shard else 0
                assert abs(count - n_c / num_replicas) < 1
    if name == "kmeans":  # every cluster spread evenly over the ranks
        clusters = samplers[0].clusters
        for k in torch.unique(clusters).tolist():
            n_k = int((clusters == k).sum())
            for shard in exact:
                count = int((clusters[torch.tensor(shard, dtype=torch.long)] == k).sum()) if shard else 0
                assert abs(count - n_k / num_replicas) < 1


@SETTINGS
@given(data=datasets(), epoch=st.integers(0, 3), drop_last=st.booleans(), shuffle=st.booleans())
def test_random_is_torch_distributed_sampler(data, epoch, drop_last, shuffle):
    n, num_replicas, labels, seed = data
    ds = _dataset(n, labels)
    for r in range(num_replicas):
        ours = make_partitioner("random", ds, num_replicas=num_replicas, rank=r, seed=seed, drop_last=drop_last, shuffle=shuffle)
        torch_sampler = DistributedSampler(ds, num_replicas=num_replicas, rank=r, seed=seed, drop_last=drop_last, shuffle=shuffle)
        ours.set_epoch(epoch)
        torch_sampler.set_epoch(epoch)
        assert list(ours) == list(torch_sampler)


def test_reshuffled_each_epoch_and_kmeans_local_is_skewed():
    labels = torch.arange(200) % 4
    x = torch.nn.functional.one_hot(labels, 4).float() * 10 + torch.randn(200, 4) * 0.1
    ds = TensorDataset(x, labels)
    s = make_partitioner("random", ds, num_replicas=2, rank=0)
    assert s.shards(0) != s.shards(1)
    local = make_partitioner("kmeans_local", ds, num_replicas=4, rank=0)
    report = local.report()
    assert report.size_spread <= 1
    assert report.max_tv_distance > 0.7  # each rank one cluster = one label: non-IID
    strat = make_partitioner("stratified", ds, num_replicas=4, rank=0).report()
    assert strat.max_tv_distance <= 0.02 + 1e-9  # 12.5 per class and rank: +-0.5 is the floor
    assert "TV distance" in str(strat)


def test_unknown_partitioner_and_option_errors():
    ds = TensorDataset(torch.randn(10, 2), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError) as err:
        make_partitioner("by_magic", ds, num_replicas=2, rank=0)
    for name in PARTITIONERS:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="num_clusters"):
        make_partitioner("stratified", ds, num_replicas=2, rank=0, num_clusters=3)
    with pytest.raises(ValueError, match="rank=5"):
        make_partitioner("random", ds, num_replicas=2, rank=5)
    with pytest.raises(ValueError, match="empty"):
        make_partitioner("random", TensorDataset(torch.zeros(0, 2)), num_replicas=2, rank=0)


def test_dict_samples_name_the_option_to_pass():
    """A dataset of dict samples (as many hubs return) has no (input, label) pair to read."""

    class Records(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), float(i)), "label": i % 3}

    with pytest.raises(ValueError, match=r"Records\[0\] is a dict.*labels=\[\.\.\.\]"):
        make_partitioner("stratified", Records(), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match=r"Records\[0\] is a dict.*features=\.\.\."):
        make_partitioner("kmeans", Records(), num_replicas=2, rank=0)
    # the fixes the messages name
    stratified = make_partitioner("stratified", Records(), num_replicas=2, rank=0, labels=[i % 3 for i in range(12)])
    assert sorted(stratified.labels[list(stratified)].tolist()) == [0, 0, 1, 1, 2, 2]
    features = torch.arange(12.0).reshape(12, 1)
    assert len(list(make_partitioner("kmeans", Records(), num_replicas=2, rank=0, num_clusters=2, features=features))) == 6


def test_data_module_partition_option():
    from lightning_distnn.data import DigitsDataModule

    with pytest.raises(ValueError, match="stratified"):
        DigitsDataModule(partition="nope")
    dm = DigitsDataModule(image_size=8, partition="stratified", batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()  # no trainer: one replica, the partitioner still orders the samples
    assert sorted(loader.sampler) == list(range(len(dm.train_set)))
    assert dm.partition_report is not None and dm.partition_report.num_replicas == 1
    assert DigitsDataModule(image_size=8).setup() is None


# ---------------------------------------------------------------------------- vertical
@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(1, 12)),
    parts=st.integers(1, 6),
    name=st.sampled_from(["strips_h", "strips_w", "channels"]),
)
def test_feature_plans_tile_the_sample(shape, parts, name):
    dim = {"strips_h": 1, "strips_w": 2, "channels": 0}[name]
    if parts > shape[dim]:
        with pytest.raises(ValueError, match="cannot split"):
            make_feature_plan(name, shape, parts)
        return
    plan = make_feature_plan(name, shape, parts)
    x = torch.randn(3, *shape)
    pieces = plan.split(x)
    assert torch.equal(torch.cat(pieces, dim=dim + 1), x)
    lengths = [s.length for s in plan]
    assert max(lengths) - min(lengths) <= 1
    assert [p.shape[1:] for p in pieces] == [torch.Size(s) for s in plan.input_shapes()]


def test_feature_plan_errors_and_dataset():
    with pytest.raises(ValueError, match="strips_h"):
        make_feature_plan("diagonal", (3, 8, 8), 2)
    with pytest.raises(ValueError, match="columns"):
        image_strips((10,), 2)
    plan = make_feature_plan("columns", 10, 3)
    assert [s.length for s in plan] == [4, 3, 3]
    ds = TensorDataset(torch.arange(40.0).reshape(4, 10), torch.arange(4))
    sliced = FeatureSliceDataset(ds, plan[1])
    xb, yb = next(iter(DataLoader(sliced, batch_size=4)))
    assert torch.equal(xb, plan[1].take(ds.tensors[0])) and torch.equal(yb, torch.arange(4))
    assert "| 1 | 0 | [4, 7) |" in str(plan)
