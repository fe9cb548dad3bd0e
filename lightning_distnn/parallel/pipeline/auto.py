"""Measured inputs for the automatic choices: the p2p link, and the micro-batch count of a plan.

:func:`measure_link` times point-to-point messages between two ranks of a group (a
:class:`~lightning_distnn.partition.model.LinkCost` for :func:`~lightning_distnn.partition.model.balanced`'s
``link``); :func:`auto_microbatches` turns a profiled :class:`~lightning_distnn.partition.model.StagePlan`
and that link into :func:`~lightning_distnn.parallel.pipeline.schedules.choose_microbatches`'s
numbers (the building block for ``microbatches="auto"``).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

from lightning_distnn.parallel.pipeline.schedules import choose_microbatches, schedule_name, stage_ranks
from lightning_distnn.partition.model import LinkCost, StagePlan


def measure_link(
    group: Optional[dist.ProcessGroup] = None,
    *,
    ranks: tuple[int, int] = (0, 1),
    repeats: int = 20,
    big_bytes: int = 1 << 22,
    device: Optional[torch.device] = None,
) -> Optional[LinkCost]:
    """One-way latency (half a ping-pong of 4 bytes) and bandwidth (``big_bytes`` one way) between two group ranks.

    Called by the two ranks in ``ranks`` (group ranks); returns the :class:`LinkCost` there and
    ``None`` on the others, which do not take part. Medians over ``repeats`` exchanges.
    """
    me = dist.get_rank(group)
    if me not in ranks:
        return None
    peer = ranks[1] if me == ranks[0] else ranks[0]
    device = device or torch.device("cpu")
    small = torch.zeros(1, device=device)
    big = torch.zeros(max(1, big_bytes // 4), device=device)

    def pingpong(t: torch.Tensor) -> None:
        if me == ranks[0]:
            dist.send(t, group=group, group_dst=peer)
            dist.recv(t, group=group, group_src=peer)
        else:
            dist.recv(t, group=group, group_src=peer)
            dist.send(t, group=group, group_dst=peer)

    def one_way(t: torch.Tensor, n: int) -> float:
        pingpong(t)  # warm-up
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            pingpong(t)
            samples.append((time.perf_counter() - start) / 2)
        return statistics.median(samples)

    latency = one_way(small, repeats)
    big_s = one_way(big, max(3, repeats // 4))
    bandwidth = big.numel() * big.element_size() / max(big_s - latency, 1e-9)
    return LinkCost(latency_s=latency, bandwidth_Bps=bandwidth)


def auto_microbatches(
    plan: StagePlan,
    batch_size: int,
    *,
    profiled_batch: int,
    cut_bytes: list[float],
    link: LinkCost,
    schedule: str,
    pp_size: int,
    max_microbatches: Optional[int] = None,
) -> int:
    """The micro-batch count for a batch of ``batch_size`` under ``plan`` (see :func:`choose_microbatches`).

    ``plan.costs`` are the per-layer seconds measured on ``profiled_batch`` samples (forward +
    backward, :func:`~lightning_distnn.partition.model.profile_layer_costs`) and ``cut_bytes`` the
    per-layer output bytes for the same samples (:func:`~lightning_distnn.partition.model.layer_output_bytes`).
    The busiest rank's compute is scaled to the whole batch; its messages per micro-batch are 2
    (activation and gradient) per stage boundary it touches across ranks; the bytes scale with the batch.
    """
    if plan.costs is None:
        raise ValueError("auto_microbatches needs a plan with measured layer costs (partition='balanced' or costs=...).")
    name = schedule_name(schedule)
    owners = stage_ranks(name, plan.num_stages, pp_size)
    scale = batch_size / profiled_batch
    compute = [0.0] * pp_size
    messages = [0] * pp_size
    moved = [0.0] * pp_size
    for s, layers in enumerate(plan.stages):
        rank = owners[s]
        compute[rank] += scale * sum(plan.costs[i] for i in layers)
        for boundary, neighbour in ((layers[0] - 1, s - 1), (layers[-1], s + 1)):
            if 0 <= neighbour < plan.num_stages and owners[neighbour] != rank:
                messages[rank] += 2
                moved[rank] += 2 * scale * cut_bytes[boundary] / link.bandwidth_Bps
    busiest = max(range(pp_size), key=lambda r: compute[r] + moved[r] + messages[r] * link.latency_s)
    return choose_microbatches(
        batch_size,
        schedule=name,
        pp_size=pp_size,
        num_stages=plan.num_stages,
        compute_seconds=max(compute[busiest], 1e-12),
        message_seconds=messages[busiest] * link.latency_s,
        transfer_seconds=moved[busiest],
        max_microbatches=max_microbatches,
    )
