"""The Hydra entry point: ``distnn-train`` (or ``python -m lightning_distnn.train``).

One machine, the main job (case-study CNN at CPU width, digits, data parallel over 2 processes)::

    distnn-train
    distnn-train strategy=dp trainer.devices=4 model.net.conv_filters=64 data.batch_size=32
    distnn-train experiment=quick          # toy size, seconds

Several machines: start the same command on every node under torchrun or SLURM with
``trainer.num_nodes=N``; Lightning's cluster environments supply the ranks.

``train(cfg)`` does the work and returns the metrics; ``main`` is only the Hydra wrapper.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

import lightning_distnn  # noqa: F401  (registers the strategy names)
from lightning_distnn.callbacks import RunStats, format_table
from lightning_distnn.strategies import get_strategy

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_strategy(cfg_strategy: Any):
    """A strategy from a config node (``_target_``), a registered name, or None (Lightning's auto)."""
    if cfg_strategy is None:
        return "auto"
    if isinstance(cfg_strategy, str):
        return get_strategy(cfg_strategy) if cfg_strategy.startswith("distnn_") else cfg_strategy
    return hydra.utils.instantiate(cfg_strategy)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and summarise one run described by ``cfg``; returns the metrics (on every rank)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    strategy = build_strategy(cfg.get("strategy"))
    stats = RunStats()
    output_dir = Path(cfg.get("output_dir") or os.getcwd())
    logger = pl.loggers.CSVLogger(str(output_dir), name="csv", version="")
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, strategy=strategy, callbacks=[stats], logger=logger)
    trainer.fit(model, datamodule=datamodule)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("run_test", True):
        for result in trainer.test(model, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    metrics.update(stats.stats)
    metrics["strategy"] = type(trainer.strategy).__name__
    if trainer.is_global_zero:
        summary = {
            "strategy": metrics["strategy"],
            "processes": trainer.world_size,
            "test acc": metrics.get("test/acc", float("nan")),
            "images/s": metrics.get("images_per_s", float("nan")),
            "params/rank": ", ".join(str(p) for p in metrics.get("params_per_rank", [])),
        }
        if "comm_bytes_per_step" in metrics:
            sent = [r.get("sent", 0.0) + r.get("allreduce", 0.0) for r in metrics["comm_bytes_per_step"]]
            summary["bytes sent/step (max rank)"] = max(sent)
        if "pipeline_bubble" in metrics:
            bubble = metrics["pipeline_bubble"][0]
            summary["bubble (measured / theory)"] = f"{bubble.get('measured', float('nan')):.3f} / {bubble.get('theory', float('nan')):.3f}"
        print("\n" + format_table([summary]) + "\n")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics


def _relaunch_multirun_job() -> int:
    """Run this multirun job as a single run in its own directory (fresh process group per job).

    Lightning's launcher re-executes the command line for ranks > 0; inside a Hydra sweep that
    would re-run the whole sweep. So each job of ``-m`` is started as an ordinary run, whose
    ranks then share that job's directory.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    command = [sys.executable, "-m", "lightning_distnn.train", *hc.overrides.task]
    command.append(f"hydra.run.dir={hc.runtime.output_dir}")
    return subprocess.call(command, cwd=hydra.utils.get_original_cwd())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and "LOCAL_RANK" not in os.environ:
        code = _relaunch_multirun_job()
        if code:
            raise RuntimeError(f"multirun job {hc.job.num} ({' '.join(hc.overrides.task)}) exited with {code}")
        metrics_file = Path(hc.runtime.output_dir) / "metrics.json"
        return json.loads(metrics_file.read_text()).get("test/acc") if metrics_file.exists() else None
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = hc.runtime.output_dir
    metrics = train(cfg)
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
