"""Data sync: seeds, partitions and cluster assignments are computed once and agreed by every rank."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_distnn import sync
from lightning_distnn.partition import PARTITIONERS, make_partitioner
from lightning_distnn.testing import run_distributed

N = 90


def _rank_dataset(rank):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (N,), generator=g)
    x = torch.randn(N, 6, generator=g) + labels.float().unsqueeze(1)
    # each rank sees slightly different features (as after a different preprocessing or library version)
    x = x + 0.5 * torch.randn(N, 6, generator=torch.Generator().manual_seed(100 + rank))
    return TensorDataset(x, labels)


def _sync_rank(rank, world_size):
    out = {"seed": sync.agree_seed(100 + rank)}
    out["tensor"] = sync.compute_once(lambda: torch.randn(4, generator=torch.Generator().manual_seed(rank)))
    out["object"] = sync.compute_once(lambda: {"rank": rank})
    ds = _rank_dataset(rank)
    for agreed in (True, False):
        for name in PARTITIONERS:
            options = {"num_clusters": 4} if name.startswith("kmeans") else {}
            sampler = make_partitioner(
                name, ds, num_replicas=world_size, rank=rank, seed=100 + rank, sync_ranks=agreed, **options
            )
            sampler.set_epoch(1)
            key = f"{name}/{'agreed' if agreed else 'local'}"
            out[key] = {"iterated": list(sampler), "print": sync.fingerprint(sampler.shards(1))}
            if agreed:
                sync.check_agreement(sampler.shards(1), f"the {name} partition")  # raises on any difference
    try:
        sync.check_agreement(rank, "the rank")
        out["disagreement_detected"] = False
    except RuntimeError as err:
        out["disagreement_detected"] = "ranks [1, 2] differ" in str(err)
    return out


@pytest.mark.slow
def test_ranks_agree_on_seed_partition_and_clusters():
    results = run_distributed(_sync_rank, 3, timeout=180, init_process_group=True)
    assert [r["seed"] for r in results] == [100, 100, 100]
    for r in results:
        assert torch.equal(r["tensor"], results[0]["tensor"]) and r["object"] == {"rank": 0}
        assert r["disagreement_detected"]
    for name in PARTITIONERS:
        agreed = [r[f"{name}/agreed"] for r in results]
        assert len({a["print"] for a in agreed}) == 1, name
        iterated = [i for a in agreed for i in a["iterated"]]
        assert sorted(iterated) == list(range(N)), name  # 90 = 3 x 30: every sample exactly once
    # without the broadcast, rank-local seeds and features give partitions that do not fit together
    for name in ("random", "stratified", "kmeans"):
        local = [r[f"{name}/local"] for r in results]
        assert len({a["print"] for a in local}) > 1, name


def test_helpers_without_process_group():
    assert sync.agree_seed(5) == 5
    assert sync.compute_once(lambda: 3) == 3
    assert sync.check_agreement([1, 2], "anything") == sync.fingerprint([1, 2])
    with pytest.raises(TypeError, match="seed"):
        sync.agree_seed("zero")
    assert isinstance(sync.agree_seed(None), int)
    assert sync.epoch_seed(7, 2) == 9
