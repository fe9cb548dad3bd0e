"""Measure layouts for real: train each for a few steps with ``lightning.Trainer`` and its registered strategy.

:func:`measure_layouts` spawns ``world_size`` gloo processes (:func:`lightning_distnn.testing.run_distributed`);
in them each layout is trained, one after the other, with the strategy the planner would use
(:func:`~lightning_distnn.planner.search.strategy_for`), on random data of the planned global batch.
The step time is the median interval between consecutive ``on_train_batch_end`` calls after
``warmup`` steps (rank 0's clock), so the optimizer step and every collective are inside it.
``rounds > 1`` interleaves the layouts (A B C A B C ...) so drift of a shared machine hits all alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_distnn.planner.cost import Calibration, Estimate, Layout
from lightning_distnn.planner.search import strategy_for


class StepTimer(pl.Callback):
    """Wall-clock time of every training step (end to end of consecutive batches)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


def heap_in_use() -> int:
    """Bytes the C heap has handed out and not freed (glibc ``mallinfo2``: arenas + mmapped blocks); -1 elsewhere.

    Unlike the resident set this is exact: freed memory the allocator keeps for reuse is not counted.
    torch's CPU tensors are allocated there, so it is the CPU's ``max_memory_allocated``.
    """
    if _MALLINFO2 is None:
        return -1
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class MemoryProbe(pl.Callback):
    """Peak heap of one training step, as the cost model's memory ``M`` counts it.

    At ``setup`` (the module built, not yet sharded) it notes the heap minus the module's own
    parameters and buffers: what the process holds that is not the model. During step
    ``step_index`` (after the timed steps, so sampling does not slow them) a thread samples
    :func:`heap_in_use` every ``interval`` seconds, and forward hooks and the loop's hooks sample
    too. ``peak`` = the highest sample minus that base: parameters, gradients, optimizer states,
    activations and buffers of this rank, plus whatever the framework allocates in the step.
    """

    def __init__(self, step_index: int, interval: float = 5e-4) -> None:
        self.step_index, self.interval = step_index, interval
        self.base = self.peak = -1
        self._top = -1
        self._active = False
        self._thread: Optional[threading.Thread] = None
        self._hook = None

    def _sample(self, *_: Any) -> None:
        if self._active:
            self._top = max(self._top, heap_in_use())

    def setup(self, trainer, pl_module, stage) -> None:
        if heap_in_use() < 0:
            return
        gc.collect()
        own = sum(t.numel() * t.element_size() for t in list(pl_module.parameters()) + list(pl_module.buffers()))
        self.base = heap_in_use() - own
        self._hook = torch.nn.modules.module.register_module_forward_hook(self._sample)

    def _poll(self) -> None:
        while self._active:
            self._sample()
            time.sleep(self.interval)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.base >= 0 and trainer.global_step == self.step_index:
            self._active = True
            self._sample()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._sample()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._sample()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._sample()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            self._sample()
            self._active = False
            self._thread.join()
            self.peak = self._top - self.base

    def teardown(self, trainer, pl_module, stage) -> None:
        self._active = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> int:
    """Reset this process's peak resident set (Linux ``clear_refs``); returns the current RSS in bytes (0 elsewhere)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return 0
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident set since :func:`reset_peak_rss`, in bytes (0 where /proc is missing)."""
    return _status_kb("VmHWM") * 1024


def _measure_rank(rank: int, world_size: int, factory: Callable[..., nn.Sequential], factory_kwargs: dict,
                  sample_shape: Sequence[int], num_classes: int, global_batch: int, layouts: Sequence[Layout],
                  steps: int, warmup: int, rounds: int, timeout: float,
                  trainer_kwargs: Optional[dict] = None, throwaway: bool = True) -> dict[str, dict[str, list[float]]]:
    """One rank of :func:`measure_layouts`; under torchrun call it directly (``trainer_kwargs``: e.g.
    ``{"devices": 2, "num_nodes": 2}``; default ``devices=world_size``). ``throwaway``: train the first
    layout once, untimed, before the timed rounds."""
    from lightning_distnn.models import ImageClassifier
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    out: dict[str, dict[str, list[float]]] = {layout.label: {"steps": [], "peak": [], "heap": []} for layout in layouts}
    generator = torch.Generator().manual_seed(0)
    n = global_batch * (steps + warmup + 1)
    x = torch.randn(n, *sample_shape, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    # one untimed run of the first layout before the timed ones: the first fit of a process pays for lazy
    # imports, allocator growth and thread pools, which would otherwise fall on whichever layout runs first
    plan = [(layout, False) for layout in layouts[:1] if throwaway]
    plan += [(layout, True) for _ in range(rounds) for layout in layouts]
    for layout, timed in plan:
        torch.manual_seed(0)
        module = ImageClassifier(factory(**factory_kwargs), num_classes=num_classes)
        strategy = strategy_for(layout).build(timeout=timeout)
        timer = StepTimer()
        probe = MemoryProbe(step_index=steps + warmup)  # one more step, untimed: its heap is sampled
        options = {"devices": world_size, **(trainer_kwargs or {})}
        trainer = quiet_trainer(strategy, max_steps=steps + warmup + 1, callbacks=[timer, probe],
                                **options)
        base = reset_peak_rss()
        trainer.fit(module, datamodule=FixedDataModule(x, y, global_batch // layout.dp))
        if not timed:
            continue
        out[layout.label]["peak"].append(float(peak_rss() - base) if base else float("nan"))
        out[layout.label]["heap"].append(float(probe.peak) if probe.peak >= 0 else float("nan"))
        out[layout.label]["steps"].extend(timer.intervals()[max(0, warmup - 1):steps + warmup - 1])
    return out


def measure_layouts(
    layouts: Sequence[Layout],
    factory: Callable[..., nn.Sequential],
    factory_kwargs: dict,
    sample_shape: Sequence[int],
    *,
    global_batch: int,
    num_classes: int = 10,
    steps: int = 3,
    warmup: int = 1,
    rounds: int = 1,
    timeout: float = 1800.0,
    collective_timeout: float = 300.0,
) -> dict[str, dict[str, Any]]:
    """Train every layout for ``warmup + steps`` steps.

    Returns label -> ``{"step_s": median step seconds, "samples": [...], "peak_heap_bytes": ...,
    "peak_rss_bytes": ...}``: the largest peak heap of any rank in one more (untimed) step, as
    :class:`MemoryProbe` counts it (glibc; NaN elsewhere) -- what the memory model ``M`` predicts --
    and the largest growth of any rank's resident set during ``fit`` (rough: it counts pages the
    allocator keeps, and misses pages it reuses).
    """
    if not layouts:
        return {}
    worlds = {layout.world_size for layout in layouts}
    if len(worlds) != 1:
        raise ValueError(f"measure_layouts runs one world size at a time, got layouts of sizes {sorted(worlds)}.")
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps} and warmup={warmup} must be at least 1 (the first step includes set-up).")
    from lightning_distnn.testing import run_distributed

    results = run_distributed(_measure_rank, worlds.pop(), factory, factory_kwargs, tuple(sample_shape), num_classes,
                              global_batch, list(layouts), steps, warmup, rounds, collective_timeout, timeout=timeout)
    out = {}
    for label, data in results[0].items():
        out[label] = summarize_rank_results(results, label)
    return out


def measure_layouts_in_group(
    layouts: Sequence[Layout],
    factory: Callable[..., nn.Sequential],
    factory_kwargs: dict,
    sample_shape: Sequence[int],
    *,
    global_batch: int,
    num_classes: int = 10,
    steps: int = 3,
    warmup: int = 1,
    rounds: int = 1,
    collective_timeout: float = 300.0,
) -> dict[str, dict[str, Any]]:
    """:func:`measure_layouts` in the processes of a running job (under torchrun: every rank calls it at once).

    Lightning trains on the process group that is already initialised (``devices`` = the ranks of this
    node, ``LOCAL_WORLD_SIZE``; ``num_nodes`` = world size / that) and the group is kept, never destroyed
    and made again: under torchrun every default group registers its address under the same key of the
    launcher's store, so a second one would read the first one's stale addresses and connect to closed
    ports ("connectFullMesh ... Connection refused" across nodes). Every rank gets the summaries.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("measure_layouts_in_group needs an initialised process group (run it under torchrun); "
                         "outside one use measure_layouts, which spawns its own processes.")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node < 1 or world % per_node:
        raise ValueError(f"LOCAL_WORLD_SIZE={per_node} does not divide the world size {world}: launch the same "
                         "--nproc-per-node on every node.")
    mine = _measure_rank(rank, world, factory, factory_kwargs, tuple(sample_shape), num_classes, global_batch,
                         list(layouts), steps, warmup, rounds, collective_timeout,
                         trainer_kwargs={"devices": per_node, "num_nodes": world // per_node})
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return {layout.label: summarize_rank_results(everyone, layout.label) for layout in layouts}


def summarize_rank_results(results: Sequence[dict], label: str) -> dict[str, Any]:
    """Rank 0's median step time; the largest memory of any rank (heap peak, and resident-set growth)."""
    samples = results[0][label]["steps"]
    peaks = [max(r[label]["peak"]) for r in results if r[label]["peak"]]
    heaps = [max(r[label]["heap"]) for r in results if r[label]["heap"]]
    return {"step_s": statistics.median(samples) if samples else float("nan"), "samples": samples,
            "peak_rss_bytes": max(peaks) if peaks else float("nan"),
            "peak_heap_bytes": max(heaps) if heaps else float("nan"),
            "peak_heap_per_rank": [max(r[label]["heap"]) if r[label]["heap"] else float("nan") for r in results]}


def fit_calibration(estimates: Sequence[Estimate], measured_s: Sequence[float], *,
                    fit_compute_scale: bool = False) -> Calibration:
    """Fit the framework terms to measured steps: ``measured - S = step_s + action_s a + collective_s c + compute_scale C``.

    ``a``, ``c``, ``C`` are each layout's pipeline actions, tensor-parallel collectives and profiled
    compute (``Estimate.features``). Non-negative least squares over the subsets of the unknowns;
    unknowns the layouts do not vary (no pipeline or no tensor parallelism among them) stay 0.
    ``compute_scale`` stays 1 unless ``fit_compute_scale`` (and at least 4 layouts): on a noisy
    machine it trades off against ``step_s`` and fits noise (seen in the benchmark), while
    ``step_s`` carries over from one model to another.
    """
    if len(estimates) != len(measured_s) or not estimates:
        raise ValueError(f"fit_calibration needs one measurement per estimate, got {len(estimates)} and {len(measured_s)}.")
    names = ("step_s", "action_s", "collective_s", "compute_scale")
    rows = [[1.0, e.features["actions"], e.features["collectives"], e.features["compute"]] for e in estimates]
    ys = [m - e.features["comm"] for e, m in zip(estimates, measured_s)]
    n = len(rows)
    varying = [0] + [j for j in (1, 2, 3) if len({round(r[j], 12) for r in rows}) > 1 and (j != 3 or (n >= 4 and fit_compute_scale))]
    best: tuple[float, dict[str, float]] = (float("inf"), {})
    for mask in range(1, 1 << len(varying)):
        cols = [varying[k] for k in range(len(varying)) if mask >> k & 1]
        if len(cols) > n or (3 not in cols and 0 not in cols):
            continue
        fixed = 0.0 if 3 in cols else 1.0  # compute_scale not fitted: it is 1
        A = torch.tensor([[r[j] for j in cols] for r in rows], dtype=torch.float64)
        b = torch.tensor([y - fixed * r[3] for y, r in zip(ys, rows)], dtype=torch.float64).unsqueeze(1)
        coef = torch.linalg.lstsq(A, b, driver="gelsd").solution.squeeze(1).tolist()
        if any(c < 0 for c in coef):
            continue
        resid = float(((A @ torch.tensor(coef, dtype=torch.float64).unsqueeze(1) - b) ** 2).sum())
        if resid < best[0] - 1e-15:
            values = dict(zip((names[j] for j in cols), coef))
            values.setdefault("compute_scale", fixed)
            best = (resid, values)
    values = best[1] or {"compute_scale": 1.0}
    return Calibration(fitted_on=n, **{k: float(v) for k, v in values.items()})
