"""Model-sync benchmark on digits: accuracy, bytes per step and images/s of every sync mode and
compressor, as ratios to all-reduce measured in the same run (modes interleaved per repeat), and a
straggler run (one worker slowed 2x by an injected delay): async against sync parameter server.

Run (2 CPU ranks, gloo)::

    OMP_NUM_THREADS=1 python benchmarks/bench_sync.py --world 2 --epochs 12 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/bench_sync.py --only straggler

Prints markdown tables (and writes them to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.callbacks import format_table
from lightning_distnn.strategies import DataParallelStrategy
from lightning_distnn.testing import run_distributed
from lightning_distnn.testing.equivalence import quiet_trainer, tiny_classifier

MODES = {
    "allreduce": {},
    "fp16": {"compression": "fp16"},
    "bf16": {"compression": "bf16"},
    "powersgd r2": {"compression": "powersgd", "powersgd_rank": 2, "powersgd_start_iter": 2},
    "powersgd r4": {"compression": "powersgd", "powersgd_rank": 4, "powersgd_start_iter": 2},
    "powersgd r2 s10": {"compression": "powersgd", "powersgd_rank": 2, "powersgd_start_iter": 10},
    "topk 1%": {"compression": "topk", "topk_ratio": 0.01},
    "ps sync": {"sync": "parameter_server"},
    "ps sync 2 shards": {"sync": "parameter_server", "num_servers": 2},
    "ps async s=2": {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2},
    "ps async s=2 momentum 0.5": {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2, "_momentum": 0.5},
    "ps sync momentum 0.5": {"sync": "parameter_server", "_momentum": 0.5},
    "ps powersgd r2": {"sync": "parameter_server", "compression": "powersgd", "powersgd_rank": 2},
    "local_sgd p4": {"sync": "local_sgd", "local_sgd_period": 4, "local_sgd_warmup_steps": 20},
}


class Delay(pl.Callback):
    """Sleeps ``seconds`` before every training batch on ``rank`` (an injected straggler)."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and self.seconds > 0:
            time.sleep(self.seconds)


class Clock(pl.Callback):
    """This rank's images and seconds of training (from its first batch to the end of its last)."""

    def __init__(self) -> None:
        self.images, self.start, self.seconds, self.steps = 0, None, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += int(batch[0].shape[0])
        self.steps += 1
        self.seconds = time.perf_counter() - self.start  # up to this rank's last step (not the wait at the end)


def _one(world_size, kwargs, args, callbacks=(), max_steps=-1, seed=0):
    from lightning_distnn.data import DigitsDataModule

    kwargs = dict(kwargs)
    momentum = kwargs.pop("_momentum", args.momentum)  # a mode may override the optimizer's momentum
    module = tiny_classifier(seed=seed, conv_filters=args.conv_filters, fc_width=args.fc_width, image_size=args.image_size)
    module.optimizer_factory = partial(torch.optim.SGD, lr=args.lr, momentum=momentum)
    data = DigitsDataModule(image_size=args.image_size, batch_size=args.batch)
    strategy = DataParallelStrategy(timeout=300, **kwargs)
    clock = Clock()
    trainer = quiet_trainer(strategy, devices=world_size, max_epochs=args.epochs, max_steps=max_steps, callbacks=[clock, *callbacks])
    trainer.fit(module, datamodule=data)
    acc = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"] if max_steps < 0 else float("nan")
    stats = strategy.comm_bytes_per_step()
    return {"acc": acc, "sent": stats["sent"], "received": stats["received"], "images": clock.images, "seconds": clock.seconds, "steps": clock.steps}


def _modes_worker(rank, world_size, modes, args):
    rows = []
    for rep in range(args.repeats):
        for name in modes:
            rows.append((rep, name, _one(world_size, MODES[name], args, seed=rep if args.vary_seed else 0)))
    return rows


def _straggler_worker(rank, world_size, args):
    out = []
    # calibrate: the undelayed step time of sync PS, then slow rank 1 by that much (2x)
    calib = _one(world_size, {"sync": "parameter_server"}, args, max_steps=args.straggler_steps)
    step_s = calib["seconds"] / max(calib["steps"], 1)
    delay = Delay(rank=1, seconds=step_s)
    for rep in range(args.repeats):
        for name, kwargs in (
            ("ps sync", {"sync": "parameter_server"}),
            (f"ps async s={args.straggler_staleness}", {"sync": "parameter_server", "ps_mode": "async", "max_staleness": args.straggler_staleness}),
            ("ps async s=2", {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2}),
        ):
            out.append((rep, name, step_s, _one(world_size, kwargs, args, callbacks=[delay], max_steps=args.straggler_steps)))
    return out


def modes_table(results, world_size, mean_over_seeds=False):
    by_mode: dict[str, list] = {}
    for rank_rows in results:
        for rep, name, r in rank_rows:
            by_mode.setdefault(name, []).append((rep, r))
    summary = {}
    for name, items in by_mode.items():
        reps = {}
        for rep, r in items:
            reps.setdefault(rep, []).append(r)
        # per repeat: accuracy of rank 0 (all ranks test the same), bytes averaged over ranks,
        # images/s = all ranks' images / the slowest rank's time
        accs = [rs[0]["acc"] for rs in reps.values()]
        sent = [statistics.mean(r["sent"] for r in rs) for rs in reps.values()]
        ips = [sum(r["images"] for r in rs) / max(r["seconds"] for r in rs) for rs in reps.values()]
        summary[name] = (statistics.mean(accs) if mean_over_seeds else statistics.median(accs), statistics.median(sent), statistics.median(ips))
    base = summary["allreduce"]
    rows = []
    for name, (acc, sent, ips) in summary.items():
        rows.append({
            "mode": name, "test acc": acc, "acc - allreduce (points)": 100 * (acc - base[0]),
            "bytes sent/step/rank": sent, "bytes ratio": sent / base[1] if base[1] else float("nan"),
            "images/s": ips, "images/s ratio": ips / base[2],
        })
    return format_table(rows)


def straggler_table(results):
    per: dict[str, list] = {}
    step_s = results[0][0][2]
    for rank, rank_rows in enumerate(results):
        for rep, name, _, r in rank_rows:
            per.setdefault(name, []).append((rep, rank, r))
    rows, base = [], None
    for name, items in per.items():
        reps: dict[int, list] = {}
        for rep, rank, r in items:
            reps.setdefault(rep, []).append(r)
        # throughput while the job runs: the sum of every worker's own images/s (the fast worker
        # does not wait for the slow one as long as it stays within the staleness bound)
        agg = statistics.median(sum(r["images"] / r["seconds"] for r in rs) for rs in reps.values())
        wall = statistics.median(sum(r["images"] for r in rs) / max(r["seconds"] for r in rs) for rs in reps.values())
        base = base or (agg, wall)
        rows.append({"mode": name, "sum of worker images/s": agg, "ratio to sync": agg / base[0],
                     "images / job wall time": wall, "wall ratio to sync": wall / base[1]})
    return f"injected delay on rank 1: {step_s * 1000:.1f} ms per step (= its undelayed step time)\n\n" + format_table(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--conv-filters", type=int, default=32)
    p.add_argument("--fc-width", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--straggler-steps", type=int, default=40)
    p.add_argument("--straggler-staleness", type=int, default=1000)
    p.add_argument("--only", choices=["modes", "straggler"], default=None)
    p.add_argument("--modes", nargs="*", default=list(MODES))
    p.add_argument("--out", default=None)
    p.add_argument("--vary-seed", action="store_true", help="repeat r initialises the model with seed r (accuracy = median over seeds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    text = [f"# bench_sync: digits {args.image_size}px, CaseStudyCNN(conv_filters={args.conv_filters}, fc_width={args.fc_width}), "
            f"{args.world} ranks x batch {args.batch}, {args.epochs} epochs, {args.repeats} interleaved repeats (medians)\n"]
    if args.only in (None, "modes"):
        modes = ["allreduce"] + [m for m in args.modes if m != "allreduce"]
        res = run_distributed(_modes_worker, args.world, modes, args, timeout=3600)
        text.append(modes_table(res, args.world, mean_over_seeds=args.vary_seed))
        print(text[-1], flush=True)
    if args.only in (None, "straggler"):
        res = run_distributed(_straggler_worker, args.world, args, timeout=3600)
        text.append("\n## straggler\n\n" + straggler_table(res))
        print(text[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(text) + "\n")


if __name__ == "__main__":
    main()
