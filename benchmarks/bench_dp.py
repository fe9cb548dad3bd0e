"""DataParallelStrategy against Lightning's own DDPStrategy: same model, same data, same run.

    python benchmarks/bench_dp.py                 # 3 interleaved runs each, 2 CPU processes
    python benchmarks/bench_dp.py --repeats 5 --devices 2 --epochs 3 --width 32

Throughput is RunStats' steady-state training images/s (after 2 warm-up steps, all ranks),
so process launch is not counted. Target: ours / Lightning's >= 0.98.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import interleaved, summary  # noqa: E402

from lightning_distnn.callbacks import format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=32, help="conv filters of the case-study CNN")
    args = parser.parse_args()
    common = [
        "model=case_study_cpu",
        f"model.net.conv_filters={args.width}",
        "data=digits",
        f"trainer.devices={args.devices}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        "+trainer.limit_val_batches=0",
        "run_test=false",
    ]
    configs = {"distnn_dp": common + ["strategy=dp"], "lightning_ddp": common + ["strategy=lightning_ddp"]}
    values = interleaved(configs, args.repeats)
    ours, theirs = summary(values["distnn_dp"]), summary(values["lightning_ddp"])
    rows = [
        {"strategy": "Lightning DDPStrategy (baseline)", "images/s median": theirs["median"],
         "min": theirs["min"], "max": theirs["max"], "ratio to baseline": 1.0},
        {"strategy": "DataParallelStrategy (distnn_dp)", "images/s median": ours["median"],
         "min": ours["min"], "max": ours["max"], "ratio to baseline": ours["median"] / theirs["median"]},
    ]
    print(f"\ncase-study CNN width {args.width}, digits, {args.devices} CPU processes, {args.repeats} runs each\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
