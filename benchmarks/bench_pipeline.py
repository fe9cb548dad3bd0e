"""Pipeline benchmark: strategy overhead, bubble per schedule, balanced vs uniform partition.

One machine, 2 gloo processes (CPU)::

    python benchmarks/bench_pipeline.py                      # tables to stdout
    python benchmarks/bench_pipeline.py --steps 12 --repeats 3 --gantt docs/pipeline_gantt.png
    python benchmarks/bench_pipeline.py --only link,bubble --width 64 --batch 64   # issue 15's size
    python benchmarks/bench_pipeline.py --only mainjob        # (d) README command: pipeline (auto) vs data parallel

(a) PipelineStrategy inside a Lightning Trainer against a hand-written loop on raw
    torch.distributed.pipelining (same partition, schedule, micro-batches, optimizer), interleaved
    in the same run: the ratio of their step times is the strategy's overhead.
(b) the measured bubble (idle fraction of a rank, averaged over ranks and steps) of every
    schedule beside the theory ((p-1)/(m+p-1) for GPipe and 1F1B), with where the step went
    (compute, blocked receiving, sending, the schedule's own time, outside the schedule) and one
    micro-batch's stage compute beside the p2p message latency measured in the same run (the
    comparison is only meaningful where compute >= 10x latency).
    Each schedule runs without overlap (torch's own schedule classes: receives posted just before
    use, 1F1B's sends waited with the next receive) and with it (every receive posted at the
    step's start, sends completing in the background): the before/after of issue 15.
(c) balanced against uniform partition of the case-study CNN: the profiled cost of the slowest
    stage and the images/s each reaches.
(d) the main-job model (``distnn-train``'s case_study_cpu on 32 px digits, batch 32 per replica):
    PipelineStrategy with ``microbatches="auto"`` against data parallel on the same 2 processes,
    images/s, with the auto choice's reasons (compute per micro-batch vs message latency, bubble).
The load average is printed at the end: on a shared machine, report it beside the numbers.
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
from lightning_distnn.parallel.pipeline import SCHEDULES, measure_link, resolve_stages_per_rank  # noqa: E402
from lightning_distnn.partition.model import balanced, profile_layer_costs, uniform  # noqa: E402
from lightning_distnn.strategies import PipelineStrategy  # noqa: E402
from lightning_distnn.testing import run_distributed  # noqa: E402
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer  # noqa: E402


MODEL = "cnn"  # set from --model in every process (run_distributed passes args)


class _Tile(torch.nn.Module):
    """Flattens the image and tiles its pixels to ``features`` inputs (no parameters, next to no time)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        reps = -(-self.features // x.shape[1])
        return x.repeat(1, reps)[:, : self.features]


def equal_blocks(width: int, blocks: int = 8) -> torch.nn.Sequential:
    """``blocks`` layers of equal cost: Linear(width, width) + ReLU each, the last with the 10-class head.
    The first layer's input needs no gradient, so its backward computes only the weight gradient (one
    matmul where the others run two); it reads the image tiled to 1.5 x width inputs, which makes its
    forward + backward (1.5 + 1.5) cost what a hidden layer's (1 + 2) does. A balanced partition of it
    therefore has equal stages, the case the textbook bubble (p-1)/(m+p-1) assumes."""
    from torch import nn

    layers = [nn.Sequential(_Tile(3 * width // 2), nn.Linear(3 * width // 2, width), nn.ReLU())]
    layers += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks - 2)]
    layers += [nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))]
    return nn.Sequential(*layers)


def make_module(width: int) -> ImageClassifier:
    torch.manual_seed(0)
    if MODEL == "equal":
        return ImageClassifier(equal_blocks(width))
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


def message_seconds(strategy, micro, link):
    """``transfer(from_stage, to_stage)`` for the link replay: the link's latency + one activation's bytes / its
    bandwidth, the activation's size the mean over ranks of the bytes each sends forward per message."""
    pipe = strategy.pipeline
    remote = sum(1 for s in pipe.stage_indices
                 if s < pipe.num_stages - 1 and pipe.plan.stage_ranks[s + 1] != pipe.pp_rank)
    mine = [pipe.comm_bytes_per_step(training=False)["sent"] / (micro * remote) if remote else None]
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, mine[0])
    sizes = [b for b in sizes if b]
    seconds = link["latency_s"] + (statistics.mean(sizes) if sizes else 0.0) / link["bandwidth_Bps"]
    return lambda a, b: seconds


def strategy_run(world, schedule, micro, partition, steps, batch, width, x, y, overlap=True, link=None):
    module = make_module(width)
    timer = StepTimer(warmup=2)
    strategy = PipelineStrategy(schedule=schedule, microbatches=micro, partition=partition, timeout=120, overlap=overlap)
    trainer = quiet_trainer(strategy, world, steps + 2, callbacks=[timer])
    trainer.fit(module, datamodule=FixedDataModule(x, y, batch))
    records = strategy.gather_timeline()
    bubbles = [None] * world
    dist.all_gather_object(bubbles, strategy.pipeline_bubble(structural=True))
    parts = [None] * world
    breakdown = getattr(strategy.pipeline, "breakdown", None)  # absent before issue 15
    dist.all_gather_object(parts, breakdown() if breakdown else {})
    per_rank = len(strategy.pipeline.stage_indices)
    with_link = [float("nan")] * world
    if link is not None:  # the same replay with the measured link: what the schedule and the wire cost, no runtime
        transfer = message_seconds(strategy, micro, link)
        dist.all_gather_object(with_link, strategy.pipeline.structural_bubble(records, transfer))
    return {
        "step_s": timer.elapsed / max(timer.steps, 1),
        "bubble": statistics.mean(b["measured"] for b in bubbles),
        "structural": statistics.mean(b["structural"] for b in bubbles),
        "structural_link": statistics.mean(with_link),
        "theory": bubbles[0]["theory"],
        "parts": {k: statistics.mean(p.get(k, float("nan")) for p in parts) for k in parts[0]},
        "micro_compute_s": statistics.mean(p.get("compute", float("nan")) for p in parts) / (micro * per_rank),
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
    return timed_loop(lambda xb, yb: sched.step(*((xb,) if first else ()), target=yb if last else None),
                      opt, steps, batch, x, y, seed=0)


def timed_loop(step, opt, steps, batch, x, y, seed):
    """Mean seconds of ``steps`` optimizer steps of ``step(x_batch, y_batch)`` after 2 warm-up steps (a barrier
    ends each, so every rank's time is the slowest rank's)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    times = []
    for i in range(steps + 2):
        sl = order[(i * batch) % len(x):][:batch]
        start = time.perf_counter()
        opt.zero_grad()
        step(x[sl], y[sl])
        opt.step()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def raw_ddp_run(world, steps, batch, width, x, y):
    """The data-parallel twin of the raw loop: DistributedDataParallel + SGD, no Lightning, ``batch`` per rank."""
    from torch.nn.parallel import DistributedDataParallel

    module = make_module(width)
    ddp = DistributedDataParallel(module.net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return timed_loop(lambda xb, yb: module.loss_fn(ddp(xb), yb).backward(), opt, steps, batch, x, y,
                      seed=dist.get_rank())


def lightning_ddp_run(world, steps, batch, width, x, y):
    """The same data-parallel step through Lightning's own DDPStrategy: its loop's tax over :func:`raw_ddp_run`."""
    from lightning.pytorch.strategies import DDPStrategy

    module = make_module(width)
    timer = StepTimer(warmup=2)
    trainer = quiet_trainer(DDPStrategy(process_group_backend="gloo"), world, steps + 2, callbacks=[timer])
    trainer.fit(module, datamodule=FixedDataModule(x, y, batch))
    return timer.elapsed / max(timer.steps, 1)


def mainjob(world, args):
    from lightning_distnn.strategies import DataParallelStrategy

    batch, steps = 32, args.steps
    xm, ym = digits_tensors(batch * (steps + 2), image_size=32)
    rows = {"dp": [], "pipeline": []}
    choice = None
    for _ in range(args.repeats):
        for kind in ("dp", "pipeline"):
            torch.manual_seed(0)
            module = ImageClassifier(CaseStudyCNN(conv_filters=32, fc_width=256, image_size=32))
            timer = StepTimer(warmup=2)
            if kind == "dp":
                strategy = DataParallelStrategy(timeout=120)
            else:
                strategy = PipelineStrategy(schedule=args.mainjob_schedule, microbatches="auto", timeout=120)
            trainer = quiet_trainer(strategy, world, steps + 2, callbacks=[timer])
            trainer.fit(module, datamodule=FixedDataModule(xm, ym, batch))
            replicas = world if kind == "dp" else 1
            rows[kind].append(batch * replicas / (timer.elapsed / max(timer.steps, 1)))
            if kind == "pipeline":
                choice = strategy.auto_choice
                bubbles = [None] * world
                dist.all_gather_object(bubbles, strategy.pipeline_bubble())
                choice = dict(choice, measured_bubble=statistics.mean(b["measured"] for b in bubbles))
    return {"rows": rows, "choice": choice}


def body(rank, world, args):
    global MODEL
    MODEL = args.model
    x, y = digits_tensors(args.batch * 8, image_size=16)
    out = {"overhead": [], "bubble": {}, "partition": {}}
    only = set(args.only.split(","))
    if "link" in only:
        link = measure_link(dist.group.WORLD, repeats=50)
        out["link"] = {"latency_s": link.latency_s, "bandwidth_Bps": link.bandwidth_Bps}
    # (a) overhead: raw loop vs strategy, interleaved
    for _ in range(args.repeats if "overhead" in only else 0):
        for kind in ("raw", "strategy", "strategy_no_overlap", "raw_ddp", "lightning_ddp"):
            if kind == "raw":
                counts = uniform(8, world).counts
                t = raw_run(rank, world, "1f1b", args.micro, counts, args.steps, args.batch, args.width, x, y)
            elif kind == "raw_ddp":
                t = raw_ddp_run(world, args.steps, args.batch // world, args.width, x, y)
            elif kind == "lightning_ddp":
                t = lightning_ddp_run(world, args.steps, args.batch // world, args.width, x, y)
            else:
                t = strategy_run(world, "1f1b", args.micro, "uniform", args.steps, args.batch, args.width, x, y,
                                 overlap=kind == "strategy")["step_s"]
            out["overhead"].append((kind, t))
    # (b) bubble per schedule, without and with overlap (torch's own schedule classes vs early receives)
    overlaps = {"both": (False, True), "on": (True,), "off": (False,)}[args.overlap]
    for schedule in args.schedules.split(",") if "bubble" in only else ():
        for micro in (args.micro, 2 * args.micro):
            for overlap in overlaps:
                r = strategy_run(world, schedule, micro, args.partition, args.steps, args.batch, args.width, x, y,
                                 overlap=overlap, link=out.get("link"))
                out["bubble"][(schedule, micro, overlap)] = {
                    k: r[k] for k in ("step_s", "bubble", "structural", "structural_link", "theory", "bytes", "parts",
                                      "micro_compute_s")
                }
                if schedule == "1f1b" and micro == args.micro:
                    out["records"] = r["records"]
    # (d) the main-job model (case_study_cpu: width 32, FC 256, 32 px digits, batch 32 per rank): pipeline with
    # microbatches=auto against data parallel on the same 2 processes, interleaved
    if "mainjob" in only:
        out["mainjob"] = mainjob(world, args)
    # (c) balanced vs uniform on the case-study CNN (costs profiled once, on rank 0)
    box = [None]
    if "partition" not in only:
        return out
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
    parser.add_argument("--width", type=int, default=16, help="conv filters (FC width = 4x); units per layer of --model equal")
    parser.add_argument("--model", default="cnn", choices=("cnn", "equal"),
                        help="cnn: CaseStudyCNN (layers of unequal cost); equal: 8 Linear layers of equal cost (equal_blocks)")
    parser.add_argument("--gantt", default=None, help="PNG path for the 1F1B Gantt chart")
    parser.add_argument("--only", default="link,overhead,bubble,partition,mainjob",
                        help="parts to run (comma-separated)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="schedules for the bubble table")
    parser.add_argument("--partition", default="uniform", help="partition of the bubble table (uniform/balanced)")
    parser.add_argument("--overlap", default="both", choices=("both", "on", "off"),
                        help="bubble table without (torch's classes) and/or with early receives")
    parser.add_argument("--mainjob-schedule", default="interleaved_1f1b", help="schedule of the main-job comparison")
    args = parser.parse_args()
    world = 2
    results = run_distributed(body, world, args, timeout=1800, init_process_group=True, pg_timeout=120)
    res = results[0]

    raw = [t for k, t in res["overhead"] if k == "raw"]
    ours = [t for k, t in res["overhead"] if k == "strategy"]
    plain = [t for k, t in res["overhead"] if k == "strategy_no_overlap"]
    ddp = ([t for k, t in res["overhead"] if k == "raw_ddp"], [t for k, t in res["overhead"] if k == "lightning_ddp"])
    if "link" in res:
        link = res["link"]
        print(f"\np2p link (gloo, 2 processes): latency {1e6 * link['latency_s']:.1f} us per message (one way), "
              f"bandwidth {link['bandwidth_Bps'] / 1e6:.0f} MB/s")
    if raw and ours:
        _print_overhead(args, raw, ours, plain, ddp)
    if res["bubble"]:
        _print_bubble(args, res)
    if res["partition"]:
        _print_partition(args, res)
    if res.get("mainjob"):
        _print_mainjob(args, res["mainjob"])
    print(f"\nload average during the run (uptime): {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    if args.gantt:
        from lightning_distnn.pipeline_viz import plot_timeline

        r = res["bubble"][("1f1b", args.micro, args.overlap != "off")]
        plot_timeline(res["records"], args.gantt, title=f"1F1B, pp=2, m={args.micro}", bubble=r)
        print(f"\nGantt chart written to {args.gantt}")


def _print_overhead(args, raw, ours, plain, ddp=((), ())):
    print(f"\n(a) overhead, 1F1B, pp=2, m={args.micro}, batch {args.batch}, CaseStudyCNN width {args.width}, "
          f"{args.repeats} interleaved repeats of {args.steps} steps\n")
    print(format_table([
        {"run": "raw torch.distributed.pipelining loop", "step ms (median)": 1e3 * statistics.median(raw), "ratio": 1.0},
        {"run": "PipelineStrategy (Lightning Trainer)", "step ms (median)": 1e3 * statistics.median(ours),
         "ratio": statistics.median(ours) / statistics.median(raw)},
        {"run": "PipelineStrategy, overlap=False (torch's schedule classes, as the raw loop)",
         "step ms (median)": 1e3 * statistics.median(plain), "ratio": statistics.median(plain) / statistics.median(raw)},
    ]))
    print("per repeat (ms), raw / strategy / overlap=False: " + "; ".join(
        f"{1e3 * a:.1f} / {1e3 * b:.1f} / {1e3 * c:.1f}" for a, b, c in zip(raw, ours, plain)))
    raw_ddp, lightning_ddp = ddp
    if raw_ddp and lightning_ddp:
        # Lightning's own loop (hooks, DataLoader, training_step, optimizer closure) over a bare loop, measured on
        # its own DDPStrategy with the same model (batch split over the 2 replicas): the tax any strategy pays
        ddp_tax = statistics.median(lightning_ddp) - statistics.median(raw_ddp)
        pipe_tax = statistics.median(ours) - statistics.median(raw)
        print(f"\nLightning's loop tax, measured on its DDPStrategy against a raw DistributedDataParallel loop "
              f"(batch {args.batch // 2} per replica): {1e3 * statistics.median(lightning_ddp):.2f} - "
              f"{1e3 * statistics.median(raw_ddp):.2f} = {1e3 * ddp_tax:.2f} ms per step "
              f"(ratio {statistics.median(lightning_ddp) / statistics.median(raw_ddp):.3f}); "
              f"PipelineStrategy's tax over the raw pipeline loop: {1e3 * pipe_tax:.2f} ms; "
              f"beyond Lightning's own: {1e3 * (pipe_tax - ddp_tax):.2f} ms "
              f"({(pipe_tax - ddp_tax) / statistics.median(raw):+.1%} of the raw pipeline step)")
        print("per repeat (ms), raw DDP / Lightning DDPStrategy: " + "; ".join(
            f"{1e3 * a:.1f} / {1e3 * b:.1f}" for a, b in zip(raw_ddp, lightning_ddp)))


def _print_bubble(args, res):
    print(f"\n(b) bubble per schedule (pp=2; looped and V schedules 2 stages per rank; {args.partition} partition, "
          f"batch {args.batch}, model {args.model}, width {args.width})\n")
    rows = []
    latency = res.get("link", {}).get("latency_s", float("nan"))
    for (schedule, micro, overlap), r in res["bubble"].items():
        parts = r.get("parts") or {}
        span = parts.get("span", float("nan"))
        rows.append({"schedule": schedule, "m": micro, "overlap": "on" if overlap else "off",
                     "bubble measured": r["bubble"], "structural": r.get("structural", float("nan")),
                     "+ link": r.get("structural_link", float("nan")),
                     "bubble theory": r["theory"],
                     "measured/theory": r["bubble"] / r["theory"] if r["theory"] else float("nan"),
                     "measured/structural": r["bubble"] / r["structural"] if r.get("structural") else float("nan"),
                     "step ms": 1e3 * r["step_s"],
                     "mb compute ms": 1e3 * r.get("micro_compute_s", float("nan")),
                     "compute/latency": r.get("micro_compute_s", float("nan")) / latency,
                     "recv wait": parts.get("recv_wait", float("nan")) / span,
                     "send": parts.get("send", float("nan")) / span,
                     "other": parts.get("other", float("nan")) / span,
                     "outside ms": 1e3 * parts.get("outside", float("nan")),
                     "p2p KiB sent/rank": r["bytes"]["sent"] / 1024})
    print(format_table(rows))
    print("(structural: the schedule replayed with this run's measured compute times and free communication;\n"
          " + link: the same replay with every message taking the measured latency + bytes / bandwidth, sent in\n"
          " the background; the measured bubble above it is the runtime's own cost;\n"
          " recv wait / send / other: fractions of the schedule step; outside: time between steps outside it)")
    on = {(s, m): r for (s, m, o), r in res["bubble"].items() if o}
    for micro in (args.micro, 2 * args.micro):
        if ("zbv_zero_bubble", micro) in on and ("1f1b", micro) in on:
            zbv, one = on[("zbv_zero_bubble", micro)], on[("1f1b", micro)]
            print(f"ZB-V bubble / 1F1B bubble (m={micro}, overlap on): measured {zbv['bubble'] / one['bubble']:.2f} "
                  f"(target <= 0.5), structural {zbv['structural'] / one['structural']:.2f}, + link "
                  f"{zbv.get('structural_link', float('nan')) / one.get('structural_link', float('nan')):.2f}")
    try:
        from lightning_distnn.parallel.pipeline.timeline import split_waits
    except ImportError:  # before issue 15
        return
    if res.get("records"):
        waits = split_waits(res["records"])
        print(f"1F1B m={args.micro}, last step, receive waits per rank: " + "; ".join(
            f"rank {r}: waiting for the producer {1e3 * w['dependency']:.2f} ms, transfer {1e3 * w['transfer']:.2f} ms"
            for r, w in sorted(waits.items())))


def _print_partition(args, res):
    print(f"\n(c) balanced vs uniform partition, CaseStudyCNN width {args.width}, 1F1B, pp=2\n")
    rows = []
    base = res["partition"]["uniform"]["step_s"]
    for name, r in res["partition"].items():
        plan = r["plan"]
        rows.append({"partition": name, "layers/stage": str(plan.counts), "slowest stage ms": 1e3 * plan.bottleneck(),
                     "images/s": args.batch / r["step_s"], "speed-up": base / r["step_s"]})
    print(format_table(rows))
    print("\nprofiled layer costs (ms):", ", ".join(f"{1e3 * c:.3f}" for c in res["partition"]["balanced"]["plan"].costs))



def _print_mainjob(args, res):
    dp, pipe = statistics.median(res["rows"]["dp"]), statistics.median(res["rows"]["pipeline"])
    print(f"\n(d) the main-job model (CaseStudyCNN width 32, FC 256, 32 px digits, batch 32 per replica), "
          f"2 processes, {args.repeats} interleaved repeats of {args.steps} steps\n")
    choice = res["choice"] or {}
    print(format_table([
        {"run": "DataParallelStrategy (dp=2)", "images/s (median)": dp, "ratio": 1.0},
        {"run": f"PipelineStrategy({args.mainjob_schedule}, microbatches=auto -> {choice.get('microbatches')})",
         "images/s (median)": pipe, "ratio": pipe / dp},
    ]))
    if choice:
        print(f"measured bubble {choice['measured_bubble']:.3f}; {choice['why']}")


if __name__ == "__main__":
    main()
