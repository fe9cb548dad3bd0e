"""Link benchmark: every sync method on 2 simulated nodes (network namespaces, ``tc``-shaped links).

For each link speed and model width, one torchrun job per seed trains every method in turn on
digits (methods interleaved in that job, the same link for all), and reports images/s (as a ratio
to dense all-reduce at the same link, same seed, same job), bytes sent per step and test accuracy.
Needs root and iproute2 (see ``lightning_distnn.testing.cluster``).

Accuracy and speed are measured apart. The link speed does not change what the synchronous
methods compute (dense, fp16, PowerSGD, top-k, local SGD, sync parameter server, pipeline give the
same weights at every link; only asynchronous parameter-server updates depend on timing), so
accuracy over many seeds and full training comes from ``--loopback`` (2 gloo processes on this
machine, no namespaces, no root), and speed from short runs (``--max-steps``) at shaped links,
where the accuracy column means nothing (training stopped early)::

    # accuracy: 5 seeds, trained to dense's plateau, on loopback
    python benchmarks/bench_links.py --loopback --seeds 5 --epochs 30 --lr 0.02 --image-size 16 --widths 32 \
        --methods dense powersgd_r2 powersgd_r4 local_sgd_p4 local_sgd_p8 --out benchmarks/results/links_acc
    # speed: 60 steps per method at every link (root)
    python benchmarks/bench_links.py --max-steps 60 --epochs 30 --seeds 2 --lr 0.02 --image-size 16 --widths 32 \
        --methods dense fp16 powersgd_r2 powersgd_r4 topk local_sgd_p4 local_sgd_p8 --out benchmarks/results/links

Writes ``<out>/rows.jsonl`` (one row per method, link, width and seed), ``<out>/table.md`` and
(not with ``--loopback``) ``<out>/links.png`` (images/s against link speed, one line per method).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve()
LINKS = ["unlimited", "1gbit", "100mbit", "50mbit", "20mbit"]
WIDTHS = {32: 256, 64: 512}  # conv_filters -> fc_width: the main job's (conf/model/case_study_cpu) and a wider one
METHODS = {  # name -> (strategy, kwargs)
    "dense": ("dp", {}),
    "fp16": ("dp", {"compression": "fp16"}),
    "powersgd_r2": ("dp", {"compression": "powersgd", "powersgd_rank": 2, "powersgd_start_iter": 2}),
    "powersgd_r4": ("dp", {"compression": "powersgd", "powersgd_rank": 4, "powersgd_start_iter": 2}),
    "topk": ("dp", {"compression": "topk", "topk_ratio": 0.01}),
    "local_sgd_p4": ("dp", {"sync": "local_sgd", "local_sgd_period": 4}),
    "local_sgd_p8": ("dp", {"sync": "local_sgd", "local_sgd_period": 8}),
    "ps_sync": ("dp", {"sync": "parameter_server", "ps_mode": "sync"}),
    "ps_async": ("dp", {"sync": "parameter_server", "ps_mode": "async", "max_staleness": 2}),
    "pipeline": ("pipeline", {"schedule": "1f1b", "microbatches": 4, "partition": "balanced"}),
}


# ---- the worker: runs on every rank under torchrun -------------------------------------------------
def _clock():
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        """Seconds and steps of training after ``skip`` warm-up steps (PowerSGD's start, first buckets)."""

        def __init__(self, skip: int = 2) -> None:
            self.skip, self.start, self.seconds, self.steps = skip, None, 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.start is None and trainer.global_step >= self.skip:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is not None:
                self.steps += 1
                self.seconds = time.perf_counter() - self.start

    return Clock()


def train_one(method: str, *, width: int, seed: int, args) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_distnn.data import DigitsDataModule
    from lightning_distnn.models import CaseStudyCNN, ImageClassifier
    from lightning_distnn.strategies import DataParallelStrategy, PipelineStrategy
    from lightning_distnn.testing.equivalence import quiet_trainer

    kind, kwargs = METHODS[method]
    world, local = args.world, args.local
    pl.seed_everything(seed, workers=True, verbose=False)
    net = CaseStudyCNN(conv_filters=width, fc_width=WIDTHS.get(width, 8 * width), image_size=args.image_size)
    module = ImageClassifier(net, optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=args.momentum))
    if kind == "pipeline":  # the same global batch, split into micro-batches over the 2 stages
        strategy = PipelineStrategy(timeout=300, **kwargs)
        batch = args.batch * world
    else:
        ddp = {"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}
        strategy = DataParallelStrategy(timeout=300, **ddp, **kwargs)
        batch = args.batch
    data = DigitsDataModule(image_size=args.image_size, batch_size=batch, drop_last=True, eval_batch_size=batch)
    clock = _clock()
    trainer = quiet_trainer(strategy, devices=local, num_nodes=world // local, max_epochs=args.epochs,
                            max_steps=args.max_steps or -1, callbacks=[clock])
    trainer.fit(module, datamodule=data)
    acc = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    report = trainer.strategy.comm_bytes_per_step() if hasattr(trainer.strategy, "comm_bytes_per_step") else {}
    sent = float(report.get("sent", 0.0)) + float(report.get("allreduce", 0.0))
    global_batch = args.batch * world
    return {"method": method, "width": width, "seed": seed, "acc": float(acc), "sent": sent,
            "steps": clock.steps, "seconds": clock.seconds, "images": clock.steps * global_batch}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import lightning_distnn  # noqa: F401

    torch.set_num_threads(1)
    # read once: a finished Trainer's teardown may clear the launcher's variables
    args.world, args.local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    rows = []
    for width in args.widths:
        for method in args.methods:
            row = train_one(method, width=width, seed=args.seed, args=args)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, row)
            # images/s: the job's images over the slowest rank's time; bytes: mean over ranks
            row = dict(row, seconds=max(r["seconds"] for r in gathered),
                       sent=statistics.mean(r["sent"] for r in gathered), link=args.link)
            row["images_per_s"] = row["images"] / row["seconds"] if row["seconds"] else float("nan")
            rows.append(row)
            if dist.get_rank() == 0:
                print(f"[bench_links] {args.link} width {width} seed {args.seed} {method}: "
                      f"{row['images_per_s']:.1f} images/s, {row['sent']:.3g} B/step, acc {row['acc']:.4f}", flush=True)
    if dist.get_rank() == 0:
        with open(args.rows, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


# ---- the driver: builds the cluster, runs the jobs, writes the table and plot ----------------------
def table(rows: list[dict]) -> str:
    from lightning_distnn.callbacks import format_table

    out = []
    for width in sorted({r["width"] for r in rows}):
        for link in [l for l in LINKS + sorted({r["link"] for r in rows} - set(LINKS)) if any(r["link"] == l for r in rows)]:
            sel = [r for r in rows if r["width"] == width and r["link"] == link]
            base = {r["seed"]: r for r in sel if r["method"] == "dense"}
            lines = []
            for method in dict.fromkeys(r["method"] for r in sel):
                mine = [r for r in sel if r["method"] == method]
                ratios = [r["images_per_s"] / base[r["seed"]]["images_per_s"] for r in mine if r["seed"] in base]
                dacc = [100 * (r["acc"] - base[r["seed"]]["acc"]) for r in mine if r["seed"] in base]
                lines.append({
                    "link": link, "width": width, "method": method, "seeds": len(mine),
                    "images/s": statistics.mean(r["images_per_s"] for r in mine),
                    "ratio to dense": statistics.mean(ratios) if ratios else float("nan"),
                    "bytes sent/step/rank": statistics.mean(r["sent"] for r in mine),
                    "test acc": statistics.mean(r["acc"] for r in mine),
                    "acc - dense (points)": statistics.mean(dacc) if dacc else float("nan"),
                })
            out.append(format_table(lines))
    return "\n\n".join(out)


def summary(rows: list[dict]) -> str:
    """Two compact tables: images/s ratio to dense per method (rows) and link (columns), mean over
    seeds with the lowest seed in brackets; test accuracy over seeds, against dense seed by seed."""
    from lightning_distnn.callbacks import format_table

    out = []
    for width in sorted({r["width"] for r in rows}):
        sel = [r for r in rows if r["width"] == width]
        links = [l for l in LINKS + sorted({r["link"] for r in sel} - set(LINKS)) if any(r["link"] == l for r in sel)]
        base = {(r["link"], r["seed"]): r for r in sel if r["method"] == "dense"}
        speed, accuracy = [], []
        for method in dict.fromkeys(r["method"] for r in sel):
            line = {"width": width, "method": method}
            for link in links:
                ratios = [r["images_per_s"] / base[link, r["seed"]]["images_per_s"]
                          for r in sel if r["method"] == method and r["link"] == link and (link, r["seed"]) in base]
                line[link] = f"{statistics.mean(ratios):.2f} ({min(ratios):.2f})" if ratios else ""
            speed.append(line)
            mine = [r for r in sel if r["method"] == method and (r["link"], r["seed"]) in base]
            if mine:
                diffs = [100 * (r["acc"] - base[r["link"], r["seed"]]["acc"]) for r in mine]
                accuracy.append({"width": width, "method": method, "runs": len(mine),
                                 "test acc (mean)": statistics.mean(r["acc"] for r in mine),
                                 "acc - dense, points (mean)": statistics.mean(diffs),
                                 "worst run": min(diffs), "best run": max(diffs)})
        out.append("images/s ratio to dense, mean over seeds (lowest seed):\n\n" + format_table(speed))
        out.append("test accuracy (each run against dense of the same seed and link):\n\n" + format_table(accuracy))
    return "\n\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    links = [l for l in LINKS + sorted({r["link"] for r in rows} - set(LINKS)) if any(r["link"] == l for r in rows)]
    links = sorted(links, key=lambda l: -1 if l == "unlimited" else _rate(l))  # slowest on the left, unlimited right
    links = [l for l in links if l != "unlimited"] + (["unlimited"] if "unlimited" in links else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
    for ax, width in zip(axes[0], widths):
        for method in dict.fromkeys(r["method"] for r in rows):
            ys = []
            for link in links:
                sel = [r["images_per_s"] for r in rows if r["width"] == width and r["link"] == link and r["method"] == method]
                ys.append(statistics.mean(sel) if sel else float("nan"))
            ax.plot(range(len(links)), ys, marker="o", label=method, linewidth=2.5 if method == "dense" else 1.2)
        ax.set_xticks(range(len(links)), links)
        ax.set_xlabel("link speed per node")
        ax.set_ylabel("training images/s (2 nodes x 1 process)")
        ax.set_title(f"CaseStudyCNN conv_filters={width}, fc_width={WIDTHS.get(width, 8 * width)}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _rate(link: str) -> int:
    from lightning_distnn.testing.cluster import parse_link

    return parse_link(link) or 0


def _loopback_job(rank: int, world: int, args) -> None:
    worker(args)


def run_loopback(args, common: list[str]) -> None:
    """Every seed as one 2-process gloo job on this machine's loopback (no namespaces, no root)."""
    from lightning_distnn.testing import run_distributed

    for seed in range(args.seeds):
        job = argparse.Namespace(**vars(args))
        job.seed, job.link, job.worker, job.rows = seed, "loopback", True, common[common.index("--rows") + 1]
        print(f"[bench_links] seed {seed}, loopback", flush=True)
        run_distributed(_loopback_job, 2, job, timeout=args.job_timeout, env={"PYTHONPATH": str(HERE.parent.parent)})


def run_cluster(args, common: list[str], start: float) -> None:
    """Every (seed, link) as one torchrun job on 2 simulated nodes, the link shaped with ``tc``."""
    from lightning_distnn.testing.cluster import SimulatedCluster

    with SimulatedCluster(nodes=2, procs_per_node=1) as cluster:
        for seed in range(args.seeds):
            # links in a rotated order per seed, so slow drift of the machine does not favour one link
            order = args.links[seed % len(args.links):] + args.links[: seed % len(args.links)]
            for link in order:
                cluster.set_link(link)
                print(f"[bench_links] seed {seed}, link {link} ({time.monotonic() - start:.0f} s)", flush=True)
                results = cluster.run([sys.executable, str(HERE), "--worker", "--seed", str(seed), "--link", link, *common],
                                      timeout=args.job_timeout, cwd=str(HERE.parent.parent))
                print("".join(l for l in results[0].output.splitlines(True) if l.startswith("[bench_links]")), end="", flush=True)


def driver(args) -> None:
    from lightning_distnn.testing.cluster import unsupported_reason

    reason = None if args.loopback else unsupported_reason()
    if reason:
        sys.exit(f"bench_links: {reason} (--loopback runs without it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    if not args.append and rows_path.exists():
        rows_path.unlink()
    common = ["--epochs", str(args.epochs), "--max-steps", str(args.max_steps), "--bucket-cap-mb", str(args.bucket_cap_mb), "--batch", str(args.batch), "--lr", str(args.lr),
              "--momentum", str(args.momentum), "--image-size", str(args.image_size), "--rows", str(rows_path),
              "--widths", *map(str, args.widths), "--methods", *args.methods]
    start = time.monotonic()
    run_loopback(args, common) if args.loopback else run_cluster(args, common, start)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    header = (f"# bench_links: digits {args.image_size}px, "
              f"{'2 gloo processes on loopback' if args.loopback else '2 simulated nodes x 1 process'}, batch {args.batch}/rank, "
              f"{args.epochs} epoch(s){f' (at most {args.max_steps} steps)' if args.max_steps else ''}, {args.seeds} seed(s), SGD lr {args.lr} momentum {args.momentum}; "
              f"{time.monotonic() - start:.0f} s\n")
    text = header + "\n" + summary(rows) + "\n\n" + table(rows) + "\n"
    (out / "table.md").write_text(text)
    if not args.loopback:  # one "link" only: nothing to plot
        plot(rows, out / "links.png")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=LINKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="conv_filters (fc_width 8x, 256 for 32)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="per data-parallel rank (the main job's)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--bucket-cap-mb", type=float, default=0.0, help="DDP bucket size (first bucket too); 0: DDP's default")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps or --epochs, whichever comes first; 0: all epochs")
    p.add_argument("--loopback", action="store_true", help="2 gloo processes on loopback instead of the simulated cluster")
    p.add_argument("--out", default="benchmarks/results/links")
    p.add_argument("--append", action="store_true", help="keep earlier rows in <out>/rows.jsonl")
    p.add_argument("--job-timeout", type=float, default=3600.0)
    # worker mode (what torchrun starts on each node)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--link", default="unlimited", help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]  # every ratio needs its baseline from the same job
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
