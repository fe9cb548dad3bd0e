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

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent.parent))

from recipes.case_study.run import run_recipe  # noqa: E402  (the same runner, table and plot)

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
    return run_recipe(argv, recipe="resnet", layouts=LAYOUTS, modes=MODES, overrides_of=layout_overrides, results=RESULTS,
                      title="torchvision ResNet-18", doc=__doc__)


if __name__ == "__main__":
    main()
