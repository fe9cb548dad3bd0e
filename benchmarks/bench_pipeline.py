"""Pipeline benchmark: strategy overhead, bubble per schedule, balanced vs uniform partition.

One machine, 2 gloo processes (CPU)::

    python benchmarks/bench_pipeline.py                      # tables to stdout
    python benchmarks/bench_pipeline.py --steps 12 --repeats 3 --gantt docs/pipeline_gantt.png

(a) PipelineStrategy inside a Lightning Trainer against a hand-written loop on raw
    torch.distributed.pipelining (same partition, schedule, micro-batches, optimizer), interleaved
    in the same run: the ratio of their step times is the strategy's overhead.
(b) the measured bubble (idle fraction of a rank, averaged over ranks and steps) of every
    schedule beside the theory ((p-1)/(m+p-1) for GPipe and 1F1B).
(c) balanced against uniform partition of the case-study CNN: the profiled cost of the slowest
    stage and the images/s each reaches.
Timings are never asserted; only ratios measured in one run are meaningful.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_distnn.callbacks import format_table  # noqa: E402
from lightning_distnn.models import CaseStudyCNN, ImageClassifier  # noqa: E402
from lightning_distnn.parallel.pipeline import SCHEDULES, resolve_stages_per_rank  # noqa: E402
from lightning_distnn.partition.model import balanced, profile_layer_costs, uniform  # noqa: E402
from lightning_distnn.strategies import PipelineStrategy  # noqa: E402
from lightning_distnn.testing import run_distributed  # noqa: E402
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer  # noqa: E402


def make_module(width: int) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(CaseStudyCNN(conv_filters=width, fc_width=4 * width, image_size=16))


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps, self.elapsed = warmup, None, 0, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.start is not None:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.start


def strategy_run(world, schedule, micro, partition, steps, batch, width, x, y):
    module = make_module(width)
    timer = StepTimer(warmup=2)
    strategy = PipelineStrategy(schedule=schedule, microbatches=micro, partition=partition, timeout=120)
    trainer = quiet_trainer(strategy, world, steps + 2, callbacks=[timer])
    trainer.fit(module, datamodule=FixedDataModule(x, y, batch))
    records = strategy.gather_timeline()
    bubbles = [None] * world
    dist.all_gather_object(bubbles, strategy.pipeline_bubble())
    return {
        "step_s": timer.elapsed / max(timer.steps, 1),
        "bubble": statistics.mean(b["measured"] for b in bubbles),
        "theory": bubbles[0]["theory"],
        "plan": strategy.pipeline.plan,
        "records": records,
        "bytes": strategy.comm_bytes_per_step(),
    }


def raw_run(rank, world, schedule, micro, counts, steps, batch, width, x, y):
    """The hand-written baseline: PipelineStage + schedule + SGD, no Lightning."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_distnn.parallel.pipeline import local_stage_indices, stage_module

    module = make_module(width)
    net = module.net
    per_rank = resolve_stages_per_rank(schedule, None)
    num_stages = world * per_rank
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    indices = local_stage_indices(schedule, num_stages, world, rank)
    mods = [stage_module(net, list(range(bounds[s], bounds[s + 1]))) for s in indices]
    stages = [PipelineStage(m, s, num_stages, torch.device("cpu"), group=dist.group.WORLD) for s, m in zip(indices, mods)]
    cls = SCHEDULES[schedule]
    sched = cls(stages[0] if per_rank == 1 and schedule in ("gpipe", "1f1b") else stages, micro,
                loss_fn=module.loss_fn)
    opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=0.05, momentum=0.9)
    first, last = 0 in indices, num_stages - 1 in indices
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(steps + 2):
        sl = order[(step * batch) % len(x):][:batch]
        start = time.perf_counter()
        opt.zero_grad()
        sched.step(*((x[sl],) if first else ()), target=y[sl] if last else None)
        opt.step()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def body(rank, world, args):
    x, y = digits_tensors(args.batch * 8, image_size=16)
    out = {"overhead": [], "bubble": {}, "partition": {}}
    # (a) overhead: raw loop vs strategy, interleaved
    for _ in range(args.repeats):
        for kind in ("raw", "strategy"):
            if kind == "raw":
                counts = uniform(8, world).counts
                t = raw_run(rank, world, "1f1b", args.micro, counts, args.steps, args.batch, args.width, x, y)
            else:
                t = strategy_run(world, "1f1b", args.micro, "uniform", args.steps, args.batch, args.width, x, y)["step_s"]
            out["overhead"].append((kind, t))
    # (b) bubble per schedule
    for schedule in SCHEDULES:
        for micro in (args.micro, 2 * args.micro) if schedule in ("gpipe", "1f1b") else (args.micro,):
            r = strategy_run(world, schedule, micro, "uniform", args.steps, args.batch, args.width, x, y)
            out["bubble"][(schedule, micro)] = {k: r[k] for k in ("step_s", "bubble", "theory", "bytes")}
            if schedule == "1f1b" and micro == args.micro:
                out["records"] = r["records"]
    # (c) balanced vs uniform on the case-study CNN (costs profiled once, on rank 0)
    box = [None]
    if rank == 0:
        box[0] = profile_layer_costs(make_module(args.width).net, x[: args.batch // args.micro], repeats=7)
    dist.broadcast_object_list(box, src=0)
    for name in ("uniform", "balanced"):
        plan = balanced(box[0], world) if name == "balanced" else uniform(8, world, costs=box[0])
        times = []
        for _ in range(args.repeats):
            times.append(strategy_run(world, "1f1b", args.micro, plan.counts, args.steps, args.batch, args.width, x, y)["step_s"])
        out["partition"][name] = {"plan": plan, "step_s": statistics.median(times)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--width", type=int, default=16, help="conv filters (FC width = 4x)")
    parser.add_argument("--gantt", default=None, help="PNG path for the 1F1B Gantt chart")
    args = parser.parse_args()
    world = 2
    results = run_distributed(body, world, args, timeout=1800, init_process_group=True, pg_timeout=120)
    res = results[0]

    raw = [t for k, t in res["overhead"] if k == "raw"]
    ours = [t for k, t in res["overhead"] if k == "strategy"]
    print(f"\n(a) overhead, 1F1B, pp=2, m={args.micro}, batch {args.batch}, CaseStudyCNN width {args.width}, "
          f"{args.repeats} interleaved repeats of {args.steps} steps\n")
    print(format_table([
        {"run": "raw torch.distributed.pipelining loop", "step ms (median)": 1e3 * statistics.median(raw), "ratio": 1.0},
        {"run": "PipelineStrategy (Lightning Trainer)", "step ms (median)": 1e3 * statistics.median(ours),
         "ratio": statistics.median(ours) / statistics.median(raw)},
    ]))
    print(f"\n(b) bubble per schedule (pp=2; looped and V schedules 2 stages per rank)\n")
    rows = []
    for (schedule, micro), r in res["bubble"].items():
        rows.append({"schedule": schedule, "m": micro, "bubble measured": r["bubble"], "bubble theory": r["theory"],
                     "step ms": 1e3 * r["step_s"], "p2p KiB sent/rank": r["bytes"]["sent"] / 1024})
    print(format_table(rows))
    print(f"\n(c) balanced vs uniform partition, CaseStudyCNN width {args.width}, 1F1B, pp=2\n")
    rows = []
    base = res["partition"]["uniform"]["step_s"]
    for name, r in res["partition"].items():
        plan = r["plan"]
        rows.append({"partition": name, "layers/stage": str(plan.counts), "slowest stage ms": 1e3 * plan.bottleneck(),
                     "images/s": args.batch / r["step_s"], "speed-up": base / r["step_s"]})
    print(format_table(rows))
    print("\nprofiled layer costs (ms):", ", ".join(f"{1e3 * c:.3f}" for c in res["partition"]["balanced"]["plan"].costs))
    if args.gantt:
        from lightning_distnn.pipeline_viz import plot_timeline

        r = res["bubble"][("1f1b", args.micro)]
        plot_timeline(res["records"], args.gantt, title=f"1F1B, pp=2, m={args.micro}", bubble=r)
        print(f"\nGantt chart written to {args.gantt}")


if __name__ == "__main__":
    main()
