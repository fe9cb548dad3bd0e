"""Bring your own model: torchvision's ResNet-18 trained data-, pipeline-, tensor- and hybrid-parallel.

The network is a plain torchvision ``ResNet`` (BasicBlock 2-2-2-2) with a CIFAR stem and a width
knob (``lightning_distnn.models.resnet18_cifar``, ``conf/model/resnet18.yaml``), inside the
unchanged ``ImageClassifier``: only the ``strategy`` argument differs between the layouts.

    dp      data over the processes                             strategy=dp
    pp      the 15 cut points (stem, 8 residual blocks, head)   strategy=pipeline  (pp=2, 1f1b, balanced)
            over 2 pipeline stages
    tp      every residual block sharded over 2 ranks           strategy=tp        (tp=2)
            (one all-reduce per block)
    hybrid  pp=2 x tp=2 on 4 processes                          strategy=hybrid

Modes:
    cpu   width 8, digits 32x32, 2 epochs, gloo CPU processes (2 for dp/pp/tp, 4 for hybrid)
    full  width 64 (the published ResNet-18), CIFAR-10 files (--data-dir), GPUs
    toy   width 4, 16x16 digits, a few steps: what CI runs

    python recipes/resnet/run.py --mode cpu                   # writes outputs/resnet/<date>_<time>/
    python recipes/resnet/run.py --mode cpu --update-results  # replaces recipes/resnet/results/
    python recipes/resnet/run.py --mode toy --out /tmp/resnet
    python recipes/resnet/run.py --mode full --data-dir /data/cifar --dry-run

It writes ``results.md`` (the table), ``results.json``, ``results.png`` (per layout: test
accuracy, images/s, parameters per rank, bytes sent per step, pipeline bubble) and one log per
layout into ``--out`` (default: a new scratch directory under ``./outputs/resnet/``); the committed
results in ``recipes/resnet/results/`` change only with ``--update-results``. Under a pipeline,
BatchNorm normalises each micro-batch (docs/resnet.md): accuracies are comparable, not identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent.parent))

from recipes.case_study.run import dry_run, plot, row, run_layout  # noqa: E402  (same runner, table and plot)

# layout -> (strategy overrides, processes in cpu/full mode, processes in toy mode)
LAYOUTS: dict[str, tuple[list[str], int, int]] = {
    "dp": (["strategy=dp"], 2, 2),
    "pp": (["strategy=pipeline", "strategy.pp=2", "strategy.microbatches=4"], 2, 2),
    "tp": (["strategy=tp", "strategy.tp=2"], 2, 2),
    "hybrid": (["strategy=hybrid", "strategy.dp=1", "strategy.pp=2", "strategy.tp=2", "strategy.microbatches=4"], 4, 4),
}

MODES: dict[str, list[str]] = {
    "cpu": ["model=resnet18", "model.net.width=8", "data=digits", "data.drop_last=true", "trainer=cpu",
            "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
    "full": ["model=resnet18", "model.net.width=64", "data=cifar10", "data.drop_last=true", "trainer=gpu",
             "trainer.max_epochs=30"],
    "toy": ["model=resnet18", "model.net.width=4", "data=digits", "data.image_size=16", "data.drop_last=true",
            "data.batch_size=16", "trainer=toy"],
}


def layout_overrides(layout: str, mode: str, devices: int | None, nodes: int) -> list[str]:
    strategy, procs, toy_procs = LAYOUTS[layout]
    n = toy_procs if mode == "toy" else procs
    return [*strategy, *MODES[mode], f"trainer.devices={devices or n // nodes}", f"trainer.num_nodes={nodes}"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="cpu")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ./outputs/resnet/<date>_<time>/)")
    parser.add_argument("--update-results", action="store_true",
                        help=f"write into the committed results ({RESULTS}) that the README shows")
    parser.add_argument("--dry-run", action="store_true", help="compose the configs of every layout, run nothing")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: layout / nodes)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (full mode)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every layout")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; valid: {', '.join(LAYOUTS)}")
    if args.update_results and args.mode == "toy":
        parser.error(f"--update-results replaces the committed results ({RESULTS}), which come from --mode cpu: "
                     "a toy run must not overwrite them. Use --mode cpu (or full), or drop --update-results.")
    if args.update_results and args.out is not None:
        parser.error(f"--update-results writes to {RESULTS}: drop --out (or drop --update-results to write to --out).")
    extra = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    per_layout = {name: layout_overrides(name, args.mode, args.devices, args.nodes) + extra for name in layouts}
    if args.dry_run:
        dry_run(per_layout)
        return []
    from lightning_distnn.callbacks import format_table

    if args.out is None:
        args.out = RESULTS if args.update_results else Path("outputs", "resnet", time.strftime("%Y-%m-%d_%H-%M-%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for layout in layouts:
            rows.append(row(layout, run_layout(layout, per_layout[layout], log_dir)))
            for name in os.listdir(log_dir):
                if name.endswith(".log"):
                    (args.out / name).write_text((log_dir / name).read_text())
    command = "python recipes/resnet/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(rows)
    (args.out / "results.md").write_text(f"`{command.strip()}`\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(rows, args.out / "results.png", f"torchvision ResNet-18 ({args.mode} mode)")
    print(f"\n{table}\n\nresults in {args.out}")
    return rows


if __name__ == "__main__":
    main()
