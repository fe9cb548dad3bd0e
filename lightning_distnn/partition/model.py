"""Model partitioners: which top-level layers of an ``nn.Sequential`` each pipeline stage holds.

A partition is plain data, a :class:`StagePlan`: one list of layer indices per stage, contiguous
and in order, with the per-layer costs it was computed from. It prints as a table::

    >>> print(balanced([4.0, 1.0, 1.0, 1.0, 1.0, 4.0], stages=2))   # doctest: +NORMALIZE_WHITESPACE
    | stage | layers | cost | share |
    |---|---|---|---|
    | 0 | 0-2 | 6 | 0.5 |
    | 1 | 3-5 | 6 | 0.5 |

Three partitioners:

* :func:`uniform`: the same number of layers per stage (the first stages take one more when the
  count does not divide).
* :func:`balanced`: the contiguous split that minimises the cost of the slowest stage, exactly
  (dynamic programming over prefix sums, ``O(stages * layers^2)``; ties go to the split whose
  earlier stages are as long as possible). Given the bytes each cut would send
  (:func:`layer_output_bytes`) and the link (:class:`LinkCost`, measured p2p latency and
  bandwidth), a stage's cost includes the messages across its two cuts, so the split avoids
  cutting where activations are large.
* :func:`explicit`: a list of layer counts per stage, e.g. ``[3, 5]``.

:func:`profile_layer_costs` measures each layer's forward + backward time on the device the
layer lives on, which is what :func:`balanced` usually gets.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

PARTITION_METHODS = ("balanced", "uniform")


@dataclass(frozen=True)
class LinkCost:
    """A point-to-point link between pipeline ranks: seconds per message and bytes per second (measured)."""

    latency_s: float
    bandwidth_Bps: float

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not self.bandwidth_Bps > 0:
            raise ValueError(
                f"LinkCost(latency_s={self.latency_s}, bandwidth_Bps={self.bandwidth_Bps}) needs a latency >= 0 and "
                "a bandwidth > 0 (bytes per second): pass the measured p2p numbers."
            )

    def seconds(self, nbytes: float) -> float:
        """Time of one message of ``nbytes``."""
        return self.latency_s + nbytes / self.bandwidth_Bps

    def cut_seconds(self, nbytes: float) -> float:
        """What one cut costs each of its two stages per micro-batch in training: the activation and its gradient."""
        return 2.0 * self.seconds(nbytes)


@dataclass
class StagePlan:
    """Layers per pipeline stage, as plain data.

    Attributes:
        stages: for each stage, the indices of its layers in the ``nn.Sequential`` (contiguous).
        costs: cost of each layer (seconds or any unit); ``None`` when the partition did not use costs.
        method: how the plan was made (``"balanced"``, ``"uniform"``, ``"explicit"``).
        stage_ranks: the pipeline rank that runs each stage (filled by the pipeline builder; empty
            means "not placed yet").
        comm_costs: per stage, the modelled seconds of its cut messages per micro-batch (``None``
            when the partition ignored communication).
    """

    stages: list[list[int]]
    costs: Optional[list[float]] = None
    method: str = "explicit"
    stage_ranks: list[int] = field(default_factory=list)
    comm_costs: Optional[list[float]] = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_layers(self) -> int:
        return sum(len(s) for s in self.stages)

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.stages]

    def stage_costs(self) -> list[float]:
        """Summed layer cost per stage (unit costs when the plan has none), plus its cut messages if modelled."""
        costs = self.costs if self.costs is not None else [1.0] * self.num_layers
        comm = self.comm_costs or [0.0] * self.num_stages
        return [float(sum(costs[i] for i in layers)) + c for layers, c in zip(self.stages, comm)]

    def bottleneck(self) -> float:
        """Cost of the slowest stage: what bounds the pipeline's throughput."""
        return max(self.stage_costs())

    def rows(self) -> list[dict[str, object]]:
        costs = self.stage_costs()
        total = sum(costs) or 1.0
        rows = []
        for s, layers in enumerate(self.stages):
            row: dict[str, object] = {"stage": s}
            if self.stage_ranks:
                row["rank"] = self.stage_ranks[s]
            row["layers"] = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
            row["cost"] = costs[s]
            if self.comm_costs is not None:
                row["of which comm"] = self.comm_costs[s]
            row["share"] = costs[s] / total
            rows.append(row)
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        columns = list(rows[0])

        def fmt(v: object) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
        return "\n".join(lines)


def _check_stages(num_layers: int, stages: int) -> None:
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be a positive integer.")
    if stages > num_layers:
        raise ValueError(
            f"{stages} pipeline stages need at least {stages} layers, the model has {num_layers}: lower the "
            "number of stages (strategy pp degree x stages_per_rank) or deepen the model (more top-level "
            "blocks in its nn.Sequential)."
        )


def _from_counts(counts: Sequence[int]) -> list[list[int]]:
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def uniform(num_layers: int, stages: int, *, costs: Optional[Sequence[float]] = None) -> StagePlan:
    """Equal layer counts per stage; the first ``num_layers % stages`` stages take one more."""
    _check_stages(num_layers, stages)
    base, extra = divmod(num_layers, stages)
    counts = [base + (1 if s < extra else 0) for s in range(stages)]
    return StagePlan(_from_counts(counts), costs=list(map(float, costs)) if costs is not None else None, method="uniform")


def explicit(counts: Sequence[int], *, num_layers: Optional[int] = None, costs: Optional[Sequence[float]] = None) -> StagePlan:
    """A plan from layer counts per stage, e.g. ``[3, 5]`` = layers 0-2 on stage 0, 3-7 on stage 1."""
    counts = list(counts)
    if not counts or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
        raise ValueError(
            f"partition={counts!r} is not a list of layer counts per stage: give one positive integer per stage, "
            "e.g. partition=[3, 5] for 8 layers on 2 stages."
        )
    if num_layers is not None and sum(counts) != num_layers:
        raise ValueError(
            f"partition={counts} covers {sum(counts)} layers, but the model has {num_layers}: the counts must add up "
            f"to {num_layers}."
        )
    return StagePlan(_from_counts(counts), costs=list(map(float, costs)) if costs is not None else None, method="explicit")


def balanced(
    costs: Sequence[float],
    stages: int,
    *,
    cut_bytes: Optional[Sequence[float]] = None,
    link: Optional[LinkCost] = None,
) -> StagePlan:
    """The contiguous split of ``costs`` into ``stages`` non-empty parts minimising the costliest part.

    Exact: dynamic programming over prefix sums. ``best[k][j]`` is the smallest possible bottleneck
    of the first ``j`` layers on ``k`` stages; ``best[k][j] = min_i max(best[k-1][i], cost(i, j))``.
    Without communication ``cost(i, j) = sum(costs[i:j])``. With ``cut_bytes`` (``cut_bytes[i]``:
    bytes layer ``i`` outputs per micro-batch, what a cut after it sends) and ``link``, each stage
    also pays ``link.cut_seconds`` for the cut at its start and the one at its end (``costs`` must
    then be seconds per micro-batch, as :func:`profile_layer_costs` measures).
    """
    costs = [float(c) for c in costs]
    if any(c < 0 or c != c for c in costs):
        raise ValueError(f"layer costs must be non-negative numbers, got {costs}.")
    n = len(costs)
    _check_stages(n, stages)
    if (cut_bytes is None) != (link is None):
        raise ValueError("balanced() weighs cuts with both cut_bytes (bytes per layer output) and link (LinkCost), "
                         "or with neither: pass both.")
    cut = [0.0] * (n + 1)  # cut[i]: seconds of the boundary before layer i (0 at the ends)
    if cut_bytes is not None:
        if len(cut_bytes) != n:
            raise ValueError(f"got {len(cut_bytes)} cut sizes for {n} layers: give the output bytes of every layer.")
        for i in range(1, n):
            cut[i] = link.cut_seconds(float(cut_bytes[i - 1]))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            # scan i downwards so ties keep the longest earlier stages (last stage lightest)
            for i in range(j - 1, k - 2, -1):
                value = max(best[k - 1][i], prefix[j] - prefix[i] + cut[i] + cut[j])
                if value < best[k][j]:
                    best[k][j], arg[k][j] = value, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = arg[k][j]
        bounds.append((i, j))
        j = i
    bounds.reverse()
    plan = StagePlan([list(range(i, j)) for i, j in bounds], costs=costs, method="balanced")
    if cut_bytes is not None:
        plan.comm_costs = [cut[i] + cut[j] for i, j in bounds]
    return plan


def make_plan(
    partition: Union[str, Sequence[int]],
    num_layers: int,
    stages: int,
    *,
    costs: Optional[Sequence[float]] = None,
) -> StagePlan:
    """Dispatch on the strategy's ``partition`` argument: ``"balanced"``, ``"uniform"`` or a count list."""
    if isinstance(partition, str):
        method = partition.lower()
        if method == "uniform":
            return uniform(num_layers, stages, costs=costs)
        if method == "balanced":
            if costs is None:
                raise ValueError("partition='balanced' needs the per-layer costs (see profile_layer_costs).")
            if len(costs) != num_layers:
                raise ValueError(f"got {len(costs)} layer costs for a model of {num_layers} layers.")
            return balanced(costs, stages)
        raise ValueError(
            f"Unknown partition={partition!r}; valid: {', '.join(PARTITION_METHODS)}, or a list of layer counts per "
            "stage such as [3, 5]."
        )
    plan = explicit(list(partition), num_layers=num_layers, costs=costs)
    if plan.num_stages != stages:
        raise ValueError(
            f"partition={list(partition)} has {plan.num_stages} stages, but the pipeline has {stages} "
            "(pp degree x stages_per_rank): give one layer count per stage."
        )
    return plan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_layer_costs(
    net: nn.Sequential,
    example_input: torch.Tensor,
    *,
    repeats: int = 5,
    warmup: int = 2,
    backward: bool = True,
) -> list[float]:
    """Median forward (+ backward) seconds of each top-level layer of ``net`` on its device.

    The example input flows through the layers in order, so each layer is timed on the
    activation shape it really sees. With ``backward`` the time includes the layer's backward
    (gradients of its input and weights for a ones-shaped output gradient), which is what a
    training pipeline stage spends. Gradients the profiling leaves on parameters are cleared.
    """
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        raise TypeError(f"profile_layer_costs needs a non-empty nn.Sequential, got {type(net).__name__}.")
    device = next((p.device for p in net.parameters()), example_input.device)
    x = example_input.to(device)
    costs: list[float] = []
    was_training = net.training
    net.train()
    try:
        for layer in net:
            samples = []
            for r in range(warmup + repeats):
                inp = x.detach().requires_grad_(backward and x.is_floating_point())
                _sync(device)
                start = time.perf_counter()
                with torch.set_grad_enabled(backward):
                    out = layer(inp)
                    if backward and out.requires_grad:
                        out.backward(torch.ones_like(out))
                _sync(device)
                if r >= warmup:
                    samples.append(time.perf_counter() - start)
            costs.append(statistics.median(samples))
            x = out.detach()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return costs


def layer_output_bytes(net: nn.Sequential, example_input: torch.Tensor) -> list[int]:
    """Bytes each top-level layer of ``net`` outputs for ``example_input`` (what a cut after it sends).

    Pass one micro-batch as the example, to match :func:`profile_layer_costs` and
    :func:`balanced`'s ``cut_bytes``.
    """
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        raise TypeError(f"layer_output_bytes needs a non-empty nn.Sequential, got {type(net).__name__}.")
    device = next((p.device for p in net.parameters()), example_input.device)
    out, x = [], example_input.to(device)
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            out.append(x.numel() * x.element_size())
    return out
