"""Tensor parallel vs Lightning's ModelParallelStrategy (Linear-only plan), same model, same run.

    python benchmarks/bench_tp.py                       # 2 gloo processes, case-study CNN at CPU width
    python benchmarks/bench_tp.py --filters 64 --fc 512 --batch 32 --steps 8 --rounds 3

Both strategies train the case-study CNN (5 conv + 3 FC) on synthetic 32x32 images, tp=2, one
process per rank. Runs are interleaved (ours, baseline, ours, baseline, ...) and the table reports
medians over rounds and the ratio to the baseline measured in the same run:

* images/s: global images per second of training steps after the first (warm-up) step;
* bytes/step: what this rank sends per optimizer step, *measured* by intercepting every collective
  at the dispatcher (c10d and functional collectives; payload converted to ring traffic:
  all-reduce 2(tp-1)/tp x n, all-gather/reduce-scatter (tp-1)/tp x n) and, for ours, the *analytic*
  count :meth:`TensorParallelStrategy.comm_bytes_per_step` from the plan and activation shapes;
* params/rank: parameter elements this rank holds (Lightning's plan cannot shard the convolutions).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RING = {"allreduce": 2.0, "all_reduce": 2.0, "allgather": 1.0, "all_gather": 1.0, "reduce_scatter": 1.0,
        "broadcast": 1.0}


class CollectiveBytes(TorchDispatchMode):
    """Counts the ring traffic of every collective dispatched while active (this rank, sent bytes)."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size
        self.sent = 0.0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        ns = getattr(func, "namespace", "")
        if ns in ("c10d", "_c10d_functional", "c10d_functional"):
            kind = next((k for k in RING if k in name), None)
            if kind is not None:
                tensors = _tensors(args)
                if tensors:
                    n = sum(t.numel() * t.element_size() for t in tensors)
                    if kind in ("allgather", "all_gather") and ns == "c10d":
                        n = tensors[-1].numel() * tensors[-1].element_size() * self.group_size  # input x tp
                    elif kind in ("allgather", "all_gather"):
                        n *= self.group_size
                    self.sent += RING[kind] * (self.group_size - 1) / self.group_size * n
                    self.calls += 1
        return func(*args, **(kwargs or {}))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        out = []
        for o in obj:
            out.extend(_tensors(o))
        return out
    return []


def _worker(rank, world_size, args):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_distnn.models import CaseStudyCNN, ImageClassifier
    from lightning_distnn.models.networks import count_parameters
    from lightning_distnn.strategies import TensorParallelStrategy
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    class LinearOnly(ImageClassifier):
        """What Lightning's ModelParallelStrategy can do here: torch's Linear styles, convs replicated."""

        def configure_model(self):
            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"5.1": ColwiseParallel(), "6.0": RowwiseParallel()})

    class Meter(pl.Callback):
        def __init__(self):
            self.times, self.bytes, self.mode = [], [], None

        def on_train_batch_start(self, trainer, module, batch, i):
            self.mode = CollectiveBytes(args.tp)
            self.mode.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            self.times.append(time.perf_counter() - self.t0)
            self.mode.__exit__(None, None, None)
            self.bytes.append(self.mode.sent)

    torch.manual_seed(0)
    n = args.batch * (args.steps + 1)
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    results = {"ours": [], "lightning": []}
    for _ in range(args.rounds):
        for name in ("ours", "lightning"):
            torch.manual_seed(0)
            net = CaseStudyCNN(conv_filters=args.filters, fc_width=args.fc, image_size=32)
            if name == "ours":
                module, strategy = ImageClassifier(net), TensorParallelStrategy(tp=args.tp, timeout=120)
            else:
                module = LinearOnly(net)
                strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=args.tp)
            meter = Meter()
            trainer = quiet_trainer(strategy, devices=world_size, max_steps=args.steps, callbacks=[meter])
            trainer.fit(module, datamodule=FixedDataModule(x, y, args.batch))
            steady = meter.times[1:]
            row = {
                "images_s": args.batch * len(steady) / sum(steady),
                "bytes": statistics.median(meter.bytes[1:]),
                "params": count_parameters(module.net),
            }
            if name == "ours":
                row["analytic"] = strategy.comm_bytes_per_step()["sent"]
            results[name].append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--fc", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from lightning_distnn.testing import run_distributed

    out = run_distributed(_worker, args.tp, args, timeout=1800)[0]
    med = {k: {m: statistics.median(r[m] for r in rows) for m in rows[0]} for k, rows in out.items()}
    base = med["lightning"]
    print(f"\nCaseStudyCNN(conv_filters={args.filters}, fc_width={args.fc}), 32x32, batch {args.batch}, "
          f"tp={args.tp} gloo CPU processes, {args.steps} steps x {args.rounds} interleaved rounds (medians)\n")
    print("| strategy | images/s | vs Lightning | bytes/step sent (measured) | bytes/step (analytic) | params/rank |")
    print("|---|---|---|---|---|---|")
    for key, label in (("ours", "distnn_tp (Conv2d + Linear sharded)"),
                       ("lightning", "Lightning ModelParallelStrategy (Linear-only plan)")):
        m = med[key]
        analytic = f"{m['analytic']:,.0f}" if "analytic" in m else "-"
        print(f"| {label} | {m['images_s']:.1f} | {m['images_s'] / base['images_s']:.2f}x | {m['bytes']:,.0f} | "
              f"{analytic} | {m['params']:,.0f} |")


if __name__ == "__main__":
    main()
