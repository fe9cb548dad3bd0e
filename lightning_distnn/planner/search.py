"""Search: every layout that fits the world size, predicted, ranked; the budget refuses the ones that do not fit.

:func:`search` enumerates ``dp x pp x tp`` factorisations of the world size, and for each the
schedules (GPipe, 1F1B, interleaved 1F1B), micro-batch counts (divisors of the per-replica batch),
partitions (the balanced partitioner of :mod:`lightning_distnn.partition.model` on the profiled
per-layer times, and the uniform one), the data-parallel sync (all-reduce, parameter server) and
compression (none, fp16, bf16); predicts every one (:func:`~lightning_distnn.planner.cost.predict`)
and returns a :class:`Plan`: the ranked feasible layouts and the refused ones with their reason.
A model that fits no layout raises :class:`NoLayoutFits`, which names the knob to turn.

:meth:`Plan.strategy` is the one call a Lightning integration needs: the strategy class name,
its registered name and its constructor arguments (``.build()`` makes the strategy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from lightning_distnn.partition.model import balanced, uniform
from lightning_distnn.planner.cost import SCHEDULES, SYNCS, Calibration, Estimate, Layout, predict
from lightning_distnn.planner.links import Network
from lightning_distnn.planner.profile import ModelProfile


class NoLayoutFits(ValueError):
    """No layout of the model fits the world size, batch and memory budget; the message says which knob to turn."""


@dataclass
class StrategyChoice:
    """A lightning_distnn strategy as plain data: ``build()`` makes it."""

    class_name: str
    name: str
    kwargs: dict[str, Any]

    def build(self, **extra: Any):
        from lightning_distnn import strategies

        return getattr(strategies, self.class_name)(**{**self.kwargs, **extra})

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.class_name}({args})  # strategy={self.name!r}"


def strategy_for(layout: Layout) -> StrategyChoice:
    """The registered strategy and constructor arguments that run ``layout``."""
    compression = None if layout.compression == "none" else layout.compression
    if layout.pp == 1 and layout.tp == 1:
        if layout.sync == "parameter_server":
            return StrategyChoice("ParameterServerStrategy", "distnn_ps", {"compression": layout.compression})
        return StrategyChoice("DataParallelStrategy", "distnn_dp", {"compression": layout.compression})
    kwargs: dict[str, Any] = {"dp": layout.dp, "pp": layout.pp, "tp": layout.tp}
    if layout.pp > 1:
        kwargs.update(schedule=layout.schedule, microbatches=layout.microbatches, partition=list(layout.partition))
        if layout.stages_per_rank > 1:
            kwargs["stages_per_rank"] = layout.stages_per_rank
    if compression is not None:
        kwargs["compression"] = compression
    return StrategyChoice("HybridStrategy", "distnn_hybrid", kwargs)


@dataclass
class Plan:
    """The ranked layouts (fastest first), the refused ones, and what they were planned for."""

    ranked: list[Estimate]
    refused: list[Estimate] = field(default_factory=list)
    world_size: int = 1
    global_batch: int = 1
    max_memory_per_rank: Optional[float] = None
    network: Optional[Network] = None
    notes: list[str] = field(default_factory=list)
    profile: Optional[ModelProfile] = field(default=None, repr=False)
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    def strategy(self) -> StrategyChoice:
        """How to run the winner: ``plan.strategy().build()`` or ``Trainer(strategy=plan.strategy().name, ...)``."""
        return strategy_for(self.best.layout)

    def strategy_kwargs(self) -> dict[str, Any]:
        """The winner's strategy as ``{"class": ..., "name": ..., "kwargs": {...}}``."""
        choice = self.strategy()
        return {"class": choice.class_name, "name": choice.name, "kwargs": dict(choice.kwargs)}

    def find(self, **match: Any) -> Optional[Estimate]:
        """The fastest ranked estimate whose layout has these attribute values (e.g. ``dp=2, pp=5``)."""
        for est in self.ranked:
            if all(getattr(est.layout, k) == v for k, v in match.items()):
                return est
        return None

    def rows(self, top: Optional[int] = None) -> list[dict[str, Any]]:
        rows = []
        for rank, est in enumerate(self.ranked[:top] if top else self.ranked, start=1):
            rows.append({
                "rank": rank,
                "layout": est.layout.label,
                "step ms": est.step_s * 1e3,
                "images/s": est.images_per_s,
                "MB/rank": est.memory_bytes / 1e6,
                "MB sent/step": est.bytes_per_step / 1e6,
                "vs best": est.step_s / self.best.step_s,
            })
        return rows

    def table(self, top: Optional[int] = 10) -> str:
        return format_table(self.rows(top))

    def __str__(self) -> str:
        return self.render()

    def render(self, top: Optional[int] = 10) -> str:
        """The ranked table (``top`` rows), the winner as the seed's sums, how to run it, the refused layouts."""
        budget = f"{self.max_memory_per_rank / 1e6:.4g} MB" if self.max_memory_per_rank else "none"
        lines = [
            f"{len(self.ranked)} layouts fit {self.world_size} processes, global batch {self.global_batch}, "
            f"memory budget per rank {budget} ({len(self.refused)} refused)",
        ]
        if self.network is not None:
            lines.append(str(self.network))
        lines += ["", self.table(top), "", "winner as the seed's sums:", self.best.seed_form(), "",
                  f"run it with: {self.strategy()}"]
        if self.refused:
            lines += ["", "refused (first 5):"] + [f"  {e.layout.label}: {e.refused}" for e in self.refused[:5]]
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def est(e: Estimate) -> dict[str, Any]:
            return {
                "layout": e.layout.label,
                "dp": e.layout.dp, "pp": e.layout.pp, "tp": e.layout.tp, "schedule": e.layout.schedule,
                "microbatches": e.layout.microbatches, "partition": list(e.layout.partition),
                "sync": e.layout.sync, "compression": e.layout.compression,
                "stages_per_rank": e.layout.stages_per_rank,
                "step_s": e.step_s, "images_per_s": e.images_per_s, "memory_bytes": e.memory_bytes,
                "bytes_per_step": e.bytes_per_step,
                "terms": {t.symbol: t.value for t in e.terms},
                "memory_terms": {t.symbol: t.value for t in e.memory_terms},
                "refused": e.refused,
                "strategy": {"class": strategy_for(e.layout).class_name, "name": strategy_for(e.layout).name,
                             "kwargs": strategy_for(e.layout).kwargs},
            }

        return {
            "world_size": self.world_size, "global_batch": self.global_batch,
            "max_memory_per_rank": self.max_memory_per_rank,
            "network": self.network.to_dict() if self.network else None,
            "best": est(self.best), "ranked": [est(e) for e in self.ranked], "refused": [est(e) for e in self.refused],
            "best_terms": [{"symbol": t.symbol, "name": t.name, "value": t.value} for t in self.best.terms],
            "notes": list(self.notes),
        }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of dict rows (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    profile: ModelProfile,
    world_size: int,
    global_batch: int,
    *,
    schedules: Iterable[str] = SCHEDULES,
    syncs: Iterable[str] = SYNCS,
    compressions: Iterable[str] = ("none", "fp16"),
    max_microbatches: int = 32,
    tp_degrees: Optional[Iterable[int]] = None,
) -> list[Layout]:
    """Every layout of ``world_size`` processes the model and batch allow (partitions from the profile)."""
    n = profile.num_layers
    tps = set(tp_degrees) if tp_degrees is not None else None
    out: list[Layout] = []
    for dp in _divisors(world_size):
        if global_batch % dp:
            continue
        local = global_batch // dp
        for pp in _divisors(world_size // dp):
            tp = world_size // dp // pp
            if tp > 1 and ((tps is not None and tp not in tps) or any(tp not in layer.tp for layer in profile.layers)):
                continue
            if pp > n:
                continue
            if pp == 1:
                for sync in syncs:
                    if sync == "parameter_server" and (tp > 1 or dp == 1):
                        continue
                    for comp in compressions if dp > 1 else ("none",):
                        out.append(Layout(dp=dp, pp=1, tp=tp, sync=sync, compression=comp))
                continue
            for schedule in schedules:
                v = 2 if schedule == "interleaved_1f1b" else 1
                if pp * v > n:
                    continue
                for m in _divisors(local):
                    if m > max_microbatches or (schedule == "1f1b" and m < pp):
                        continue
                    if schedule == "interleaved_1f1b" and m % max(1, m // pp):
                        continue
                    mu = local / m
                    costs = [(layer.time("forward", mu) + layer.time("backward", mu)) *
                             ((1 - layer.tp[tp].sharded + layer.tp[tp].sharded / tp) if tp > 1 else 1.0)
                             for layer in profile.layers]
                    parts = {tuple(balanced(costs, pp * v).counts), tuple(uniform(n, pp * v).counts)}
                    for part in sorted(parts):
                        for comp in compressions if dp > 1 else ("none",):
                            out.append(Layout(dp=dp, pp=pp, tp=tp, schedule=schedule, microbatches=m, partition=part,
                                              compression=comp, stages_per_rank=v))
    return out


def search(
    profile: ModelProfile,
    network: Network,
    *,
    world_size: int,
    global_batch: int,
    max_memory_per_rank: Optional[float] = None,
    optimizer_states: int = 1,
    layouts: Optional[Iterable[Layout]] = None,
    calibration: Optional[Calibration] = None,
    **candidates: Any,
) -> Plan:
    """Predict every candidate layout (or the given ``layouts``) and rank the ones within the budget."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer (processes to train on).")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} must be a positive integer (samples per optimizer step).")
    if max_memory_per_rank is not None and not max_memory_per_rank > 0:
        raise ValueError(f"max_memory_per_rank={max_memory_per_rank!r} must be a positive number of bytes, or None.")
    layouts = list(layouts) if layouts is not None else candidate_layouts(profile, world_size, global_batch, **candidates)
    if not layouts:
        raise NoLayoutFits(
            f"no layout of {world_size} processes fits this model ({profile.num_layers} layers) and global batch "
            f"{global_batch}: the batch must split over the data-parallel degree and the micro-batches. Use a global "
            f"batch that is a multiple of {world_size}, or another world size."
        )
    estimates = [predict(layout, profile, network, global_batch=global_batch, optimizer_states=optimizer_states,
                         max_memory_per_rank=max_memory_per_rank, calibration=calibration) for layout in layouts]
    ranked = sorted((e for e in estimates if not e.refused), key=lambda e: (e.step_s, e.memory_bytes))
    refused = sorted((e for e in estimates if e.refused), key=lambda e: e.memory_bytes)
    if not ranked:
        raise NoLayoutFits(_no_fit_message(refused, world_size, global_batch, max_memory_per_rank))
    return Plan(ranked=ranked, refused=refused, world_size=world_size, global_batch=global_batch,
                max_memory_per_rank=max_memory_per_rank, network=network, calibration=calibration or Calibration())


def _no_fit_message(refused: list[Estimate], world_size: int, global_batch: int, budget: float) -> str:
    smallest = refused[0]
    terms = {t.symbol: t.value for t in smallest.memory_terms}
    weights = terms["M_1"] + terms["M_2"] + terms["M_3"]
    acts = terms["M_4"]
    knobs = [f"raise max_memory_per_rank (--max-memory-per-rank) to at least {math.ceil(smallest.memory_bytes / 1e6)} MB"]
    if acts > 0.25 * smallest.memory_bytes:
        knobs.append(f"lower the global batch ({global_batch}; activations are {acts / 1e6:.4g} MB of it) or use more "
                     "micro-batches")
    if weights > 0.25 * smallest.memory_bytes:
        knobs.append(f"train on more processes (world size {world_size}) so pipeline/tensor parallelism split the "
                     f"{weights / 1e6:.4g} MB of parameters, gradients and optimizer states, or use an optimizer with "
                     "fewer states (plain SGD)")
    return (
        f"no layout fits max_memory_per_rank={budget / 1e6:.4g} MB on {world_size} processes: the smallest, "
        f"{smallest.layout.label}, needs {smallest.memory_bytes / 1e6:.4g} MB per rank "
        f"({', '.join(f'{t.symbol} {t.name} {t.value / 1e6:.3g} MB' for t in smallest.memory_terms)}). "
        "To fit: " + "; or ".join(knobs) + "."
    )
