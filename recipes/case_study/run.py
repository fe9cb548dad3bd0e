"""The seed's case study, reproduced: one model trained data-, model- and hybrid-distributed.

The model is the seed's: 5 conv layers of 512 filters and 3 fully connected layers of 1024
units (`CaseStudyCNN`). It is trained three ways and the results are put side by side:

    (a) data   data over 10 ranks                        strategy=dp        (dp=10)
    (b) model  the model over 5 ranks, balanced stages   strategy=pipeline  (pp=5)
    (c) hybrid data x model, 2 x 5 = 10 ranks            strategy=hybrid    (dp=2, pp=5)

Modes:
    cpu   the width knob (conv 32 filters, FC 256 units), digits, gloo on CPU processes
          (10 processes on one machine: slow on 2 cores, but real)
    full  the seed's full width, CIFAR-10 (data/ or --data-dir), NCCL on GPUs (10 GPUs for (a)
          and (c), 5 for (b); set --nodes and --devices for several machines)
    toy   width 4, a few steps, 2 / 2 / 2x2 ranks: what CI runs

    python recipes/case_study/run.py --mode cpu             # writes recipes/case_study/results/
    python recipes/case_study/run.py --mode toy --out /tmp/cs
    python recipes/case_study/run.py --mode full --data-dir /data/cifar --devices 10

It writes `results.md` (the table), `results.json` and `results.png` (accuracy and throughput
per layout) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from lightning_distnn.callbacks import format_table  # noqa: E402

# layout -> (experiment config, processes in cpu/full mode, processes in toy mode)
LAYOUTS: dict[str, tuple[str, int, int]] = {
    "data": ("case_study_data", 10, 2),
    "model": ("case_study_model", 5, 2),
    "hybrid": ("case_study_hybrid", 10, 4),
}

MODES: dict[str, list[str]] = {
    "cpu": [
        "model=case_study_cpu", "data=digits", "trainer=cpu", "trainer.max_epochs=12",
        "trainer.enable_progress_bar=false",
    ],
    "full": ["model=case_study", "data=cifar10", "trainer=gpu", "trainer.max_epochs=30"],
    "toy": [
        "model=case_study_cpu", "model.net.conv_filters=4", "model.net.fc_width=16", "data=digits",
        "trainer=toy",
    ],
}


def layout_overrides(layout: str, mode: str, devices: int | None, nodes: int) -> list[str]:
    experiment, procs, toy_procs = LAYOUTS[layout]
    n = toy_procs if mode == "toy" else procs
    overrides = [f"experiment={experiment}", *MODES[mode], f"trainer.devices={devices or n // nodes}",
                 f"trainer.num_nodes={nodes}"]
    if mode == "toy" and layout != "data":
        overrides.append("strategy.pp=2")  # toy: 2 stages (model), 2 x 2 (hybrid)
    return overrides


def run_layout(layout: str, overrides: list[str], log_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run_dir = log_dir / layout
    cmd = [sys.executable, "-m", "lightning_distnn.train", *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (log_dir / f"{layout}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {layout!r} failed (log: {log_dir / f'{layout}.log'}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def row(layout: str, m: dict[str, Any]) -> dict[str, Any]:
    sent = [r.get("sent", 0.0) + r.get("allreduce", 0.0) for r in m.get("comm_bytes_per_step", [])]
    bubble = m.get("pipeline_bubble", [{}])[0] if m.get("pipeline_bubble") else {}
    params = m.get("params_per_rank", [])
    return {
        "layout": layout,
        "strategy": m.get("strategy"),
        "processes": m.get("world_size"),
        "test acc": m.get("test/acc", float("nan")),
        "images/s": m.get("images_per_s", float("nan")),
        "params/rank (max)": max(params) if params else "",
        "params/rank (min)": min(params) if params else "",
        "bytes sent/step (max rank)": max(sent) if sent else "",
        "bubble measured": bubble.get("measured", ""),
        "bubble theory": bubble.get("theory", ""),
        "wall s": m.get("wall_s", float("nan")),
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["layout"] for r in rows]
    axes[0].bar(names, [r["test acc"] for r in rows], color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("test accuracy")
    axes[1].bar(names, [r["images/s"] for r in rows], color="tab:orange")
    axes[1].set_title("training images/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="cpu")
    parser.add_argument("--layouts", default="data,model,hybrid", help="comma-separated subset of data,model,hybrid")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: layout / nodes)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (full mode)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every layout")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; valid: {', '.join(LAYOUTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    extra = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for layout in layouts:
            metrics = run_layout(layout, layout_overrides(layout, args.mode, args.devices, args.nodes) + extra, log_dir)
            rows.append(row(layout, metrics))
            for name in os.listdir(log_dir):
                if name.endswith(".log"):
                    (args.out / name).write_text((log_dir / name).read_text())
    command = "python recipes/case_study/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(rows)
    (args.out / "results.md").write_text(f"`{command.strip()}`\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(rows, args.out / "results.png", f"case study ({args.mode} mode)")
    print("\n" + table)
    return rows


if __name__ == "__main__":
    main()
