"""Links for the planner: latency and bandwidth of all-reduce and point-to-point, measured or assumed.

A :class:`Link` is the usual alpha-beta model: moving ``n`` bytes costs ``latency + n / bandwidth``.
All-reduces are counted as rings: over ``p`` ranks each rank sends ``2 (p-1)/p * n`` bytes in
``2 (p-1)`` messages, so ``t = 2 (p-1) latency + 2 (p-1)/p n / bandwidth``.

A :class:`Network` holds the link inside a node and across nodes, and which ranks share a node
(``ranks_per_node``, consecutive ranks as launchers place them): a group whose ranks span nodes
runs at the cross-node link (a ring is as slow as its slowest hop).

:func:`measure_network` runs inside the training processes (every rank calls it at once) on the
real process groups; :meth:`Network.assumed` is a stand-in when nothing was measured.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Link:
    """``latency`` seconds per message, ``bandwidth`` bytes per second."""

    latency: float
    bandwidth: float

    def p2p(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` from one rank to another."""
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0

    def allreduce(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` ranks (0 for one rank)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        return 2 * (ranks - 1) * self.latency + 2 * (ranks - 1) / ranks * nbytes / self.bandwidth

    def allgather(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-gather whose result has ``nbytes``."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        return (ranks - 1) * self.latency + (ranks - 1) / ranks * nbytes / self.bandwidth


@dataclass(frozen=True)
class Network:
    """Links inside a node and across nodes; ``ranks_per_node=0`` means one node holds every rank."""

    intra: Link
    inter: Optional[Link] = None
    ranks_per_node: int = 0
    measured: bool = False
    # seconds per fp32 gradient byte that fp16/bf16 compression adds beyond its halved wire: the two casts
    # and the backend's half-precision sums (gloo adds halves element by element on the CPU); 0 = not measured
    compress_s_per_byte: float = 0.0
    # seconds per tensor-parallel collective beyond its link time: DTensor's dispatch, redistribution and
    # sharded optimizer step on the CPU, timed on a sharded Linear pair (:func:`measure_tp_overhead`); 0 = not measured
    tp_collective_s: float = 0.0

    @classmethod
    def assumed(cls, *, latency: float = 1e-4, bandwidth: float = 1e9) -> "Network":
        """A guess for one machine's loopback (gloo on CPU: about 0.1 ms, 1 GB/s)."""
        return cls(intra=Link(latency, bandwidth))

    def link_for(self, ranks: Sequence[int]) -> Link:
        """The link a collective over these global ranks runs at."""
        if self.inter is None or self.ranks_per_node <= 0:
            return self.intra
        nodes = {r // self.ranks_per_node for r in ranks}
        return self.inter if len(nodes) > 1 else self.intra

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Network":
        inter = Link(**data["inter"]) if data.get("inter") else None
        return cls(intra=Link(**data["intra"]), inter=inter, ranks_per_node=data.get("ranks_per_node", 0),
                   measured=data.get("measured", False), compress_s_per_byte=data.get("compress_s_per_byte", 0.0),
                   tp_collective_s=data.get("tp_collective_s", 0.0))

    def __str__(self) -> str:
        def one(link: Link) -> str:
            return f"{link.latency * 1e6:.0f} us + {link.bandwidth / 1e6:.0f} MB/s"

        text = f"links ({'measured' if self.measured else 'assumed'}): within a node {one(self.intra)}"
        if self.inter is not None and self.ranks_per_node:
            text += f"; across nodes ({self.ranks_per_node} ranks per node) {one(self.inter)}"
        if self.compress_s_per_byte > 0:
            text += f"; fp16 compression {self.compress_s_per_byte * 1e9:.2f} ns per gradient byte"
        if self.tp_collective_s > 0:
            text += f"; tensor parallel {self.tp_collective_s * 1e3:.2g} ms per collective beyond the link"
        return text


def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> Link:
    """Least-squares ``seconds = latency + nbytes / bandwidth`` (latency >= 0, bandwidth > 0)."""
    n = len(nbytes)
    if n < 2:
        raise ValueError(f"fitting a link needs at least two message sizes, got {n}.")
    mx, my = sum(nbytes) / n, sum(seconds) / n
    var = sum((x - mx) ** 2 for x in nbytes)
    slope = sum((x - mx) * (y - my) for x, y in zip(nbytes, seconds)) / var if var else 0.0
    slope = max(slope, 1e-13)  # at most 10 TB/s: noise must not make the link infinitely fast
    latency = max(my - slope * mx, 0.0)
    return Link(latency=latency, bandwidth=1.0 / slope)


def _time(fn, repeats: int, group) -> float:
    samples = []
    for _ in range(repeats + 1):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[1:])


def measure_link(
    group: Optional[dist.ProcessGroup] = None,
    *,
    sizes: Sequence[int] = (1 << 10, 1 << 16, 1 << 20, 1 << 22),
    repeats: int = 5,
    kind: str = "allreduce",
) -> Link:
    """Measure the link of ``group`` (default: the world) from inside the training processes.

    Every rank of ``group`` must call it. ``kind="allreduce"`` times ring all-reduces of each size
    and fits the ring formula; ``kind="p2p"`` times a ping-pong between the group's first two ranks
    (the others wait). Every rank returns the same numbers (rank 0's, broadcast).
    """
    if kind not in ("allreduce", "p2p"):
        raise ValueError(f"kind={kind!r}; valid: 'allreduce', 'p2p'.")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    p = len(ranks)
    me = dist.get_rank()
    xs, ys = [], []
    for size in sizes:
        buf = torch.ones(max(1, size // 4))
        nbytes = buf.numel() * 4
        if kind == "allreduce":
            if p < 2:
                break
            t = _time(lambda: dist.all_reduce(buf, group=group), repeats, group)
            # ring: 2(p-1) messages, 2(p-1)/p n bytes; fit t = 2(p-1) latency + that / bandwidth
            xs.append(nbytes / p)
            ys.append(t / (2 * (p - 1)))
        else:
            if p < 2:
                break
            a, b = ranks[0], ranks[1]

            def ping():
                if me == a:
                    dist.send(buf, b, group=group)
                    dist.recv(buf, b, group=group)
                elif me == b:
                    dist.recv(buf, a, group=group)
                    dist.send(buf, a, group=group)

            t = _time(ping, repeats, group)
            xs.append(nbytes)
            ys.append(t / 2)
    if len(xs) < 2:
        return Link(latency=0.0, bandwidth=float("inf"))
    link = fit_link(xs, ys)
    out = torch.tensor([link.latency, link.bandwidth], dtype=torch.float64)
    dist.broadcast(out, src=ranks[0], group=group)
    return Link(latency=float(out[0]), bandwidth=float(out[1]))


def measure_network(*, ranks_per_node: int = 0, repeats: int = 5, sizes: Sequence[int] = (1 << 10, 1 << 16, 1 << 20, 1 << 22)) -> Network:
    """Measure the network from inside the training processes (every rank calls it, default group initialised).

    With ``ranks_per_node`` (> 0 and less than the world size) the node-local link is measured by
    point-to-point between ranks 0 and 1 and the cross-node link between rank 0 and the first rank
    of node 1; otherwise one link, from all-reduces over the world. The slower of the all-reduce
    and point-to-point fits is kept (the pipeline's sends and the gradients' all-reduce share it).
    """
    world = dist.get_world_size()
    if world < 2:
        return Network.assumed()
    if 0 < ranks_per_node < world:
        intra_group = dist.new_group([0, 1]) if ranks_per_node >= 2 else None
        inter_group = dist.new_group([0, ranks_per_node])
        intra = (measure_link(intra_group, kind="p2p", repeats=repeats, sizes=sizes)
                 if intra_group is not None and dist.get_rank() in (0, 1) else None)
        inter = (measure_link(inter_group, kind="p2p", repeats=repeats, sizes=sizes)
                 if dist.get_rank() in (0, ranks_per_node) else None)
        # compression's own cost is local work (casts, half sums): measured across the nodes' pair
        compress = (measure_compression(inter, repeats=repeats, group=inter_group)
                    if dist.get_rank() in (0, ranks_per_node) else 0.0)
        numbers = torch.zeros(5, dtype=torch.float64)
        if dist.get_rank() == 0:
            intra = intra or Link(1e-5, 1e10)
            numbers = torch.tensor([intra.latency, intra.bandwidth, inter.latency, inter.bandwidth, compress],
                                   dtype=torch.float64)
        dist.broadcast(numbers, src=0)
        inter = Link(float(numbers[2]), float(numbers[3]))
        return Network(Link(float(numbers[0]), float(numbers[1])), inter, ranks_per_node=ranks_per_node, measured=True,
                       compress_s_per_byte=float(numbers[4]), tp_collective_s=measure_tp_overhead(inter, repeats=repeats))
    ring = measure_link(None, kind="allreduce", repeats=repeats, sizes=sizes)
    pair = measure_link(None, kind="p2p", repeats=repeats, sizes=sizes)
    slow = Link(latency=max(ring.latency, pair.latency), bandwidth=min(ring.bandwidth, pair.bandwidth))
    return Network(slow, measured=True, compress_s_per_byte=measure_compression(ring, repeats=repeats),
                   tp_collective_s=measure_tp_overhead(ring, repeats=repeats))


def measure_tp_overhead(link: Link, *, width: int = 64, batch: int = 8, repeats: int = 5) -> float:
    """Seconds per tensor-parallel collective that the framework adds beyond the link's own time.

    A tensor-parallel step pays more than its all-reduces' latency and bytes: DTensor dispatches every op
    on a sharded parameter, redistributes at every sharded pair, and the optimizer steps DTensors. On a
    small model on the CPU that is milliseconds per pair, more than the compute (the main job's model
    trained 12x slower with ``strategy=tp``), and no layer profile sees it. This times a training step
    (forward, backward, SGD) of a ``Linear-ReLU-Linear`` pair sharded over every rank by the automatic
    plan, subtracts the same step unsharded and the link time of its collectives (counted as the cost
    model counts them), and divides by their number. Every rank calls it and gets rank 0's figure.
    """
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_distnn.parallel.tensor import apply_tp
    from lightning_distnn.planner.profile import tp_costs

    world = dist.get_world_size()
    if world < 2:
        return 0.0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    x = torch.randn(batch, width)
    count = sum(c.collectives for c in tp_costs(net, world, [], sample=x))
    sharded = copy.deepcopy(net)
    apply_tp(sharded, init_device_mesh("cpu", (world,)))

    def stepper(module):
        opt = torch.optim.SGD(module.parameters(), lr=1e-3)

        def step():
            module(x).sum().backward()
            opt.step()
            opt.zero_grad()
        return step

    plain, tp = stepper(net), stepper(sharded)
    plain(), tp()  # the first step allocates and warms the dispatch caches
    t_plain = _time(plain, repeats, None)
    t_tp = _time(tp, repeats, None)
    wire = count * link.allreduce(batch * width * 4, world)
    extra = torch.tensor([max(0.0, (t_tp - t_plain - wire) / max(count, 1))], dtype=torch.float64)
    dist.broadcast(extra, src=0)
    return float(extra[0])


def measure_compression(ring: Link, *, nbytes: int = 1 << 22, repeats: int = 5,
                        group: Optional[dist.ProcessGroup] = None) -> float:
    """Seconds per fp32 byte that fp16 compression of an all-reduce adds beyond its halved wire time.

    Times what the compression hook does to a bucket of ``nbytes`` fp32 bytes (cast to fp16, all-reduce,
    cast back) on ``group`` and subtracts the ring model's time for the halved bytes on ``ring``. Every
    rank of the group calls it and gets rank 0's figure (0 when compression costs nothing extra).
    """
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if len(ranks) < 2:
        return 0.0
    buf = torch.ones(nbytes // 4)

    def compressed():
        half = buf.to(torch.float16)
        dist.all_reduce(half, group=group)
        buf.copy_(half)

    t = _time(compressed, repeats, group)
    extra = torch.tensor([max(0.0, (t - ring.allreduce(nbytes / 2, len(ranks))) / nbytes)], dtype=torch.float64)
    dist.broadcast(extra, src=ranks[0], group=group)
    return float(extra[0])
