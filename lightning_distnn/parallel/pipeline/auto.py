"""Measured inputs for the automatic choices: the p2p link, and the micro-batch count of a plan.

:func:`measure_link` times point-to-point messages between two ranks of a group (a
:class:`~lightning_distnn.partition.model.LinkCost` for :func:`~lightning_distnn.partition.model.balanced`'s
``link``); :func:`auto_microbatches` turns a profiled :class:`~lightning_distnn.partition.model.StagePlan`
and that link into :func:`~lightning_distnn.parallel.pipeline.schedules.choose_microbatches`'s
numbers, and :func:`auto_choice` adds the reasons (what ``microbatches="auto"`` of the strategies logs).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from lightning_distnn.parallel.pipeline.schedules import (
    SINGLE_STAGE,
    choose_microbatches,
    modelled_step_seconds,
    schedule_name,
    stage_ranks,
    theoretical_bubble,
)
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
        for _ in range(5):  # warm-up: the first exchanges of a pair are slower
            pingpong(t)
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
    name = schedule_name(schedule)
    compute, messages, moved = _busiest_rank(plan, batch_size / profiled_batch, cut_bytes, link, name, pp_size)
    return choose_microbatches(
        batch_size,
        schedule=name,
        pp_size=pp_size,
        num_stages=plan.num_stages,
        compute_seconds=max(compute, 1e-12),
        message_seconds=messages * link.latency_s,
        transfer_seconds=moved,
        max_microbatches=max_microbatches,
    )


def _busiest_rank(
    plan: StagePlan, scale: float, cut_bytes: list[float], link: LinkCost, schedule: str, pp_size: int
) -> tuple[float, int, float]:
    """(compute seconds, messages per micro-batch, transfer seconds) of the rank with the most work."""
    if plan.costs is None:
        raise ValueError("auto_microbatches needs a plan with measured layer costs (partition='balanced' or costs=...).")
    owners = stage_ranks(schedule, plan.num_stages, pp_size)
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
    return compute[busiest], messages[busiest], moved[busiest]


def auto_choice(
    plan: StagePlan,
    batch_size: int,
    *,
    cut_bytes: list[float],
    link: LinkCost,
    schedule: str,
    pp_size: int,
) -> Union[dict[str, Any], str]:
    """``microbatches="auto"`` with its reasons: the count, the measured inputs, the model's step and bubble.

    ``plan.costs`` and ``cut_bytes`` are measured on the whole batch of ``batch_size`` samples. Also
    models the pipeline's throughput against data parallel on the same ``pp_size`` processes (each
    process computing the whole model on its share of the samples, the all-reduce left out):
    ``vs_data_parallel`` = (total compute / pp) / modelled pipeline step. ``why`` says it in one
    sentence, and when that ratio is under 0.8, why the pipeline cannot pay off at this size. Returns
    the error message (a str) where no count fits, so the caller can raise it on every rank.
    """
    name = schedule_name(schedule)
    compute, messages, moved = _busiest_rank(plan, 1.0, cut_bytes, link, name, pp_size)
    compute = max(compute, 1e-12)
    try:
        m = auto_microbatches(
            plan, batch_size, profiled_batch=batch_size, cut_bytes=cut_bytes, link=link, schedule=name, pp_size=pp_size
        )
    except ValueError as err:
        return f"microbatches='auto': {err}"
    per_rank = max(1, plan.num_stages // pp_size)
    step = modelled_step_seconds(
        m,
        schedule=name,
        pp_size=pp_size,
        stages_per_rank=per_rank,
        compute_seconds=compute,
        message_seconds=messages * link.latency_s,
        transfer_seconds=moved,
    )
    bubble = theoretical_bubble(name if name in SINGLE_STAGE else "interleaved_1f1b", pp_size, m, per_rank)
    total = sum(plan.costs)
    vs_dp = (total / pp_size) / step
    micro_compute = compute / (m * per_rank)
    latency_share = m * messages * link.latency_s / step
    why = (
        f"microbatches=auto chose m={m} for a per-replica batch of {batch_size} ({name}, pp={pp_size}): one "
        f"micro-batch's stage compute is {1e3 * micro_compute:.3f} ms against {1e3 * link.latency_s:.3f} ms per p2p "
        f"message ({micro_compute / max(link.latency_s, 1e-12):.1f}x; {messages} messages per micro-batch "
        f"on the busiest rank, {link.bandwidth_Bps / 1e6:.0f} MB/s); modelled step {1e3 * step:.2f} ms, bubble "
        f"{bubble:.2f}, throughput {vs_dp:.2f}x data parallel on the same {pp_size} processes."
    )
    if vs_dp < 0.8:
        imbalance = compute / (total / pp_size)
        why += (
            f" The pipeline cannot pay off at this size: of its modelled step, {latency_share:.0%} is message latency "
            f"and {bubble:.0%} the schedule's bubble, and the busiest rank holds {imbalance:.2f}x an equal share of "
            "the compute; data parallel has none of these (a bigger model or batch, or strategy=dp, fits better)."
        )
    return {
        "microbatches": m,
        "batch": batch_size,
        "compute_s": compute,
        "micro_compute_s": micro_compute,
        "latency_s": link.latency_s,
        "bandwidth_Bps": link.bandwidth_Bps,
        "messages": messages,
        "modelled_step_s": step,
        "bubble": bubble,
        "vs_data_parallel": vs_dp,
        "why": why,
    }
