"""The multi-process harness itself: race-free rendezvous, errors and deadlines reported, nothing left running."""

import socket
import time

import pytest
import torch
import torch.distributed as dist

from lightning_distnn.testing import DistributedTestError, _rendezvous_store, run_distributed


def _sum_of_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _sleep_forever(rank, world_size):
    time.sleep(3600)


def test_rendezvous_port_stays_bound_while_ranks_start():
    store = _rendezvous_store()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError):  # another job cannot take the port between pick and use
            s.bind(("127.0.0.1", store.port))


def test_collectives_and_deadlines():
    assert run_distributed(_sum_of_ranks, 2, init_process_group=True, timeout=120) == [3.0, 3.0]
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"did not finish within 2 s \(killed\)"):
        run_distributed(_sleep_forever, 1, timeout=2)
    assert time.monotonic() - start < 60
