"""ResNet-18 (torchvision, CIFAR stem, CPU width): tensor and pipeline parallel against their baselines, one run.

    python benchmarks/bench_resnet.py                     # width 16, 32x32, batch 32, 6 steps, 2 rounds
    python benchmarks/bench_resnet.py --width 8 --image 16 --steps 4 --rounds 1   # quick

Two gloo CPU processes. Every configuration trains the same ``resnet18_cifar(width=...)`` (a plain
torchvision ``ResNet``) on the same synthetic batches through a Lightning ``Trainer``; rounds are
interleaved so drift hits all alike, and the table reports medians and ratios to the one-process
run measured in the same job:

* ``one process``: ``Trainer(devices=1)`` on rank 0 (rank 1 waits), the baseline;
* ``distnn_tp`` (tp=2): our plan (convolutions sharded inside every residual block, one all-reduce per block);
* ``Lightning ModelParallelStrategy`` (tp=2): what torch's styles allow on this network, a Linear-only
  plan (``fc`` column-wise, output replicated; DTensor has no convolution styles);
* ``distnn_pipeline`` (pp=2, 1f1b, 4 micro-batches, balanced partition of the 15 cut points).

Columns: images/s of the training steps after the first (warm-up); bytes this rank sends per step,
measured at the dispatcher for collectives (ring traffic, as in bench_tp.py) and analytic from the
strategy (``comm_bytes_per_step``: pipeline activations + gradients, tp all-reduces); parameter
elements this rank holds; for tp, the sharded parameters' local share (target: 1/2 within 5%).
The machine is shared: timings are noisy, ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tp import CollectiveBytes  # noqa: E402  (the dispatcher-level byte counter)

LABELS = {
    "single": "one process (Trainer, devices=1)",
    "tp": "distnn_tp, tp=2 (conv blocks sharded)",
    "lightning": "Lightning ModelParallelStrategy, tp=2 (Linear-only plan)",
    "pp": "distnn_pipeline, pp=2 (1f1b, m=4, balanced)",
}


def _local_numel(module: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def _worker(rank, world_size, args):
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lightning_distnn.models import ImageClassifier, resnet18_cifar
    from lightning_distnn.parallel.tensor import sharded_parameter_numel
    from lightning_distnn.strategies import PipelineStrategy, TensorParallelStrategy
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    class LinearOnly(ImageClassifier):
        """Lightning's ModelParallelStrategy with torch's styles: only ``fc`` can be sharded."""

        def configure_model(self):
            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"fc": ColwiseParallel(output_layouts=Replicate())})

    class Meter(pl.Callback):
        def __init__(self, group_size):
            self.group_size, self.times, self.bytes = group_size, [], []

        def on_train_batch_start(self, trainer, module, batch, i):
            self.mode = CollectiveBytes(self.group_size)
            self.mode.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            self.times.append(time.perf_counter() - self.t0)
            self.mode.__exit__(None, None, None)
            self.bytes.append(self.mode.sent)

    torch.manual_seed(0)
    n = args.batch * args.steps
    x, y = torch.randn(n, 3, args.image, args.image), torch.randint(0, 10, (n,))
    results = {name: [] for name in LABELS}
    for _ in range(args.rounds):
        for name in ("tp", "lightning", "pp", "single"):  # the Trainers of the first ones set up the process group
            net = resnet18_cifar(width=args.width, seed=0)
            total = sum(p.numel() for p in net.parameters())
            module = ImageClassifier(net)
            devices = world_size
            if name == "single":
                dist.barrier()
                if rank != 0:
                    dist.barrier()
                    continue
                strategy, devices = "auto", 1
            elif name == "tp":
                strategy = TensorParallelStrategy(tp=world_size, timeout=300)
            elif name == "lightning":
                module = LinearOnly(net)
                strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world_size)
            else:
                strategy = PipelineStrategy(microbatches=4, partition="balanced", timeout=300)
            meter = Meter(world_size)
            trainer = quiet_trainer(strategy, devices=devices, max_steps=args.steps, callbacks=[meter])
            trainer.fit(module, datamodule=FixedDataModule(x, y, args.batch))
            if name == "single":
                dist.barrier()
            steady = meter.times[1:]
            row = {"images_s": args.batch * len(steady) / sum(steady), "bytes": statistics.median(meter.bytes[1:]),
                   "params": _local_numel(module.net), "total": total}
            if name in ("tp", "pp"):
                row["analytic"] = strategy.comm_bytes_per_step()["sent"]
            if name == "tp":
                local, full = sharded_parameter_numel(module.net)
                row["shard_share"] = local / full
                row["sharded_fraction"] = full / total
            results[name].append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from lightning_distnn.testing import run_distributed

    per_rank = run_distributed(_worker, 2, args, timeout=3600)
    med = {k: {m: statistics.median(r[m] for r in rows) for m in rows[0]} for k, rows in per_rank[0].items()}
    params1 = {k: rows[0]["params"] for k, rows in per_rank[1].items() if rows}
    base = med["single"]["images_s"]
    print(f"\nresnet18_cifar(width={args.width}) = torchvision ResNet, {base and med['single']['total']:,.0f} parameters; "
          f"{args.image}x{args.image}, batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds, "
          "2 gloo CPU processes (medians; rank 0's view)\n")
    print("| configuration | images/s | vs one process | bytes/step sent (measured) | bytes/step (analytic) | "
          "params rank 0 / rank 1 |")
    print("|---|---|---|---|---|---|")
    for key, label in LABELS.items():
        m = med[key]
        analytic = f"{m['analytic']:,.0f}" if "analytic" in m else "-"
        other = f"{params1[key]:,.0f}" if key in params1 else "-"
        print(f"| {label} | {m['images_s']:.1f} | {m['images_s'] / base:.2f}x | {m['bytes']:,.0f} | {analytic} | "
              f"{m['params']:,.0f} / {other} |")
    tp = med["tp"]
    print(f"\ntp=2: sharded parameters are {tp['sharded_fraction']:.1%} of the network; each rank holds "
          f"{tp['shard_share']:.3f} of them (target 0.5 within 5%: {abs(tp['shard_share'] / 0.5 - 1) < 0.05}).")
    print(f"vs Lightning's Linear-only plan: {tp['images_s'] / med['lightning']['images_s']:.2f}x images/s, "
          f"{tp['params'] / med['lightning']['params']:.2f}x parameters per rank.")


if __name__ == "__main__":
    main()
