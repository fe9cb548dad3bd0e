"""The multi-process harness itself: race-free rendezvous, errors and deadlines reported, nothing left running."""

import os
import socket
import sys
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


def _what_the_rank_sees(rank, world_size):
    return os.environ.get("DISTNN_HARNESS_PROBE"), "lightning" in sys.modules, os.getpid()


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


def test_ranks_see_the_callers_environment_and_start_preloaded(monkeypatch):
    first = run_distributed(_what_the_rank_sees, 2)  # the forkserver is running after this
    monkeypatch.setenv("DISTNN_HARNESS_PROBE", "set after the server started")
    later = run_distributed(_what_the_rank_sees, 2)
    assert [r[:2] for r in later] == [("set after the server started", True)] * 2
    assert len({r[2] for r in first + later}) == 4  # a process per rank per call


def _sum_and_probe(rank, world_size):
    return _sum_of_ranks(rank, world_size), os.environ.get("DISTNN_HARNESS_PROBE")


def test_spawn_start_method_still_works(monkeypatch):
    monkeypatch.setenv("DISTNN_HARNESS_PROBE", "spawned")
    assert run_distributed(_sum_and_probe, 2, init_process_group=True, start_method="spawn") == [(3.0, "spawned")] * 2
    with pytest.raises(ValueError, match="'fork' is not one of"):
        run_distributed(_sum_of_ranks, 2, start_method="fork")
