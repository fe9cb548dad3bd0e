"""Data distribution: loading throughput per rank (memory, image files, SQLite) and partition balance.

    python benchmarks/bench_data.py                      # 2 gloo ranks, 5 interleaved rounds, digits 32x32
    python benchmarks/bench_data.py --ranks 2 --rounds 5 --image-size 32 --workers 0 2

Throughput: every rank iterates its own shard (the ``random`` partitioner over the digits training
split, batch 64; DataLoader workers are persistent and started before timing) once per round,
source after source in turn (memory, files, SQLite, memory, ...),
so machine drift hits every source alike; the table reports the median samples/s per rank and the
ratio to the in-memory baseline measured in the same run. Ranks read concurrently, as in training.

Balance: each partitioner on the digits training split (1,258 samples) for 2, 4 and 10 ranks:
exact shard sizes, samples added by padding, and the total-variation distance of each shard's label
distribution to the global one (0 = same proportions, 1 = disjoint labels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_distnn.callbacks import format_table
from lightning_distnn.data import DigitsDataModule, ImageFolderDataset, SQLiteDataset, export_image_folder, write_sqlite
from lightning_distnn.partition import PARTITIONERS, make_partitioner
from lightning_distnn.testing import run_distributed


def _sources(folder: str, image_size: int) -> dict[str, torch.utils.data.Dataset]:
    dm = DigitsDataModule(image_size=image_size)
    dm.setup()
    x, y = dm.train_set.tensors
    return {
        "memory": TensorDataset(x, y),
        "image files (PNG)": ImageFolderDataset(Path(folder) / "images", image_size=image_size),
        "SQLite": SQLiteDataset(Path(folder) / "digits.sqlite", "train"),
    }


def _throughput_rank(rank, world_size, folder, image_size, rounds, workers):
    sources = _sources(folder, image_size)
    loaders = {}
    for name, ds in sources.items():
        for w in workers:
            sampler = make_partitioner("random", ds, num_replicas=world_size, rank=rank, sync_ranks=False)
            # persistent workers: their start-up is paid once, before the first timed round
            loaders[f"{name}|{w}"] = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=w, persistent_workers=w > 0)
    for loader in loaders.values():
        next(iter(loader))  # start workers, open connections, warm the page cache
    rates: dict[str, list[float]] = {key: [] for key in loaders}
    for epoch in range(rounds):
        for key, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            torch.distributed.barrier()  # ranks read at the same time
            start = time.perf_counter()
            count = sum(len(batch[1]) for batch in loader)
            rates[key].append(count / (time.perf_counter() - start))
    return rates


def _prepare(folder: str, image_size: int) -> None:
    dm = DigitsDataModule(image_size=image_size)
    dm.setup()
    x, y = dm.train_set.tensors
    # the image folder stores the training images in a fixed order; the folder dataset sorts them
    export_image_folder(x, y, Path(folder) / "images")
    write_sqlite(Path(folder) / "digits.sqlite", {"train": (x, y)}, num_classes=10)


def throughput_table(ranks: int, rounds: int, image_size: int, workers: list[int]) -> str:
    with tempfile.TemporaryDirectory() as folder:
        _prepare(folder, image_size)
        results = run_distributed(
            _throughput_rank, ranks, folder, image_size, rounds, workers, timeout=1800, init_process_group=True
        )
    rows = []
    baseline = {}
    for key in results[0]:
        name, w = key.split("|")
        per_rank = [median(r[key]) for r in results]
        value = sum(per_rank) / len(per_rank)
        if name == "memory":
            baseline[w] = value
        rows.append({"source": name, "workers": int(w), "samples/s per rank": value, "per rank": per_rank})
    first = str(workers[0])
    for row in rows:
        row[f"vs memory, {first} workers"] = row["samples/s per rank"] / baseline[first]
        row["vs memory, same workers"] = row["samples/s per rank"] / baseline[str(row["workers"])]
        row["per rank"] = ", ".join(f"{v:.0f}" for v in row["per rank"])
    columns = ["source", "workers", "samples/s per rank", f"vs memory, {first} workers", "vs memory, same workers"]
    return format_table(rows, columns + ["per rank"])


def balance_table(image_size: int, rank_counts: list[int]) -> str:
    dm = DigitsDataModule(image_size=image_size)
    dm.setup()
    rows = []
    for name in PARTITIONERS:
        for ranks in rank_counts:
            sampler = make_partitioner(name, dm.train_set, num_replicas=ranks, rank=0, sync_ranks=False)
            report = sampler.report()
            sizes = [r.unique for r in report.rows]
            tv = [r.tv_distance for r in report.rows]
            rows.append(
                {
                    "partition": name,
                    "ranks": ranks,
                    "shard sizes (min-max)": f"{min(sizes)}-{max(sizes)}",
                    "padded": sum(r.size for r in report.rows) - sum(sizes),
                    "label TV mean": sum(tv) / len(tv),
                    "label TV max": max(tv),
                }
            )
    return format_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    print(f"## Partition balance (digits train split, image {args.image_size})\n")
    print(balance_table(args.image_size, [2, 4, 10]), "\n", flush=True)
    if not args.skip_throughput:
        print(f"## Loading throughput ({args.ranks} ranks, {args.rounds} interleaved rounds, batch 64)\n")
        print(throughput_table(args.ranks, args.rounds, args.image_size, args.workers))


if __name__ == "__main__":
    sys.exit(main())
