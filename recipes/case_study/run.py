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

    python recipes/case_study/run.py --mode cpu             # writes outputs/case_study/<date>_<time>/
    python recipes/case_study/run.py --mode cpu --update-results   # replaces recipes/case_study/results/
    python recipes/case_study/run.py --mode toy --out /tmp/cs
    python recipes/case_study/run.py --mode full --data-dir /data/cifar --devices 10
    python recipes/case_study/run.py --mode full --dry-run  # compose the three configs, run nothing

It writes `results.md` (the table), `results.json`, `results.png` (per layout: test accuracy,
images/s, parameters per rank, bytes sent per step, pipeline bubble; values on the bars) and
one log per layout into --out: by default a new scratch directory under ./outputs/case_study/;
the committed results in recipes/case_study/results/ change only with --update-results.
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
RESULTS = HERE / "results"  # the committed results (README's table and picture)
sys.path.insert(0, str(HERE.parent.parent))

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
    sent = m.get("bytes_sent_per_step", [])  # per rank, as distnn-train sums them
    bubble = m.get("pipeline_bubble", [{}])[0] if m.get("pipeline_bubble") else {}
    params = m.get("params_per_rank", [])
    return {
        "layout": layout,
        "strategy": m.get("strategy_description") or m.get("strategy"),
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
    """One panel per quantity, values on the bars: what each layout learns, how fast, what it holds and sends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_distnn.callbacks import format_number

    def number(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else float("nan")

    names = [r["layout"] for r in rows]
    x = range(len(rows))
    panels = [
        ("test accuracy", [("", "test acc", "tab:blue")]),
        ("training images/s", [("", "images/s", "tab:orange")]),
        ("parameters per rank", [("max", "params/rank (max)", "tab:green"), ("min", "params/rank (min)", "tab:olive")]),
        ("bytes sent per step (busiest rank)", [("", "bytes sent/step (max rank)", "tab:red")]),
        ("pipeline bubble", [("measured", "bubble measured", "tab:purple"), ("theory", "bubble theory", "tab:gray")]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (panel_title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        for i, (label, key, color) in enumerate(series):
            values = [number(r.get(key)) for r in rows]
            offsets = [xi + (i - (len(series) - 1) / 2) * width for xi in x]
            bars = ax.bar(offsets, [0 if v != v else v for v in values], width, color=color, label=label or None)
            ax.bar_label(bars, labels=["-" if v != v else format_number(v) for v in values],
                         fontsize=8 if len(series) == 1 else 7, padding=2)
        ax.set_xticks(list(x), names)
        ax.set_title(panel_title, fontsize=10)
        ax.margins(y=0.18)
        if any(label for label, _, _ in series):
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), frameon=False)
    axes[0].set_ylim(0, 1.1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dry_run(overrides_per_layout: dict[str, list[str]]) -> None:
    """Compose each layout's config (what ``distnn-train ... --cfg job`` prints) without running anything."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_distnn.train import CONF_DIR

    for layout, overrides in overrides_per_layout.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        strategy = {k: v for k, v in cfg.strategy.items() if k in ("_target_", "dp", "pp", "tp", "schedule", "microbatches")}
        print(f"{layout}: distnn-train {' '.join(overrides)}\n    strategy {strategy}, devices {cfg.trainer.devices} "
              f"x nodes {cfg.trainer.num_nodes}, data {cfg.data._target_.rsplit('.', 1)[-1]}, batch {cfg.data.batch_size}")


def run_recipe(
    argv: list[str] | None,
    *,
    recipe: str,
    layouts: Any,
    modes: Any,
    overrides_of: Any,
    results: Path,
    title: str,
    doc: str | None = None,
) -> list[dict[str, Any]]:
    """The command line of a recipe that trains ``layouts`` (each one ``distnn-train`` run, with the
    Hydra overrides ``overrides_of(layout, mode, devices, nodes)``) and writes the table, the JSON
    and the plot into a scratch folder, or into ``results`` with ``--update-results``.
    ``recipes/case_study`` and ``recipes/resnet`` share it."""
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(modes), default="cpu")
    parser.add_argument("--layouts", default=",".join(layouts), help=f"comma-separated subset of {','.join(layouts)}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: a new ./outputs/{recipe}/<date>_<time>/)")
    parser.add_argument("--update-results", action="store_true",
                        help=f"write into the committed results ({results}) that the README shows")
    parser.add_argument("--dry-run", action="store_true", help="compose the configs of every layout, run nothing")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: layout / nodes)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (full mode)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every layout")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in layouts]
    if unknown:
        parser.error(f"unknown layouts {unknown}; valid: {', '.join(layouts)}")
    if args.update_results and args.mode == "toy":
        parser.error(f"--update-results replaces the committed results ({results}), which come from --mode cpu: "
                     "a toy run must not overwrite them. Use --mode cpu (or full), or drop --update-results.")
    if args.update_results and args.out is not None:
        parser.error(f"--update-results writes to {results}: drop --out (or drop --update-results to write to --out).")
    extra = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    per_layout = {name: overrides_of(name, args.mode, args.devices, args.nodes) + extra for name in chosen}
    if args.dry_run:
        dry_run(per_layout)
        return []
    from lightning_distnn.callbacks import format_table

    if args.out is None:
        args.out = results if args.update_results else Path("outputs", recipe, time.strftime("%Y-%m-%d_%H-%M-%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for layout in chosen:
            metrics = run_layout(layout, per_layout[layout], log_dir)
            rows.append(row(layout, metrics))
            for name in os.listdir(log_dir):
                if name.endswith(".log"):
                    (args.out / name).write_text((log_dir / name).read_text())
    command = f"python recipes/{recipe}/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(rows)
    (args.out / "results.md").write_text(f"`{command.strip()}`\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(rows, args.out / "results.png", f"{title} ({args.mode} mode)")
    print(f"\n{table}\n\nresults in {args.out}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return run_recipe(argv, recipe="case_study", layouts=LAYOUTS, modes=MODES, overrides_of=layout_overrides, results=RESULTS,
                      title="case study")


if __name__ == "__main__":
    main()
