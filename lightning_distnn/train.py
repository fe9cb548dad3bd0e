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
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

import lightning_distnn  # noqa: F401  (registers the strategy names)
from lightning_distnn.callbacks import RunStats, format_number, format_table
from lightning_distnn.elastic import ElasticCheckpoint, resume_path
from lightning_distnn.faults import FaultMonitor
from lightning_distnn.models.networks import count_parameters
from lightning_distnn.strategies import get_strategy

log = logging.getLogger(__name__)
TOY_STEPS = 50  # fewer optimizer steps than this: the summary says the run is a smoke test


def find_conf_dir() -> str:
    """The Hydra configs: the copy a wheel ships inside the package, else ``conf/`` of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"No Hydra configs (config.yaml) in {here / 'conf'} or {here.parent / 'conf'}: reinstall lightning_distnn "
        "(pip install .) or run from a checkout of the repository."
    )


CONF_DIR = find_conf_dir()


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_known_noise() -> None:
    """Silence messages that say nothing about the run: Lightning's product tips, and torch's
    ``LeafSpec is deprecated`` FutureWarning raised from inside Lightning (not from user code)."""
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())


class DataCheckError(ValueError):
    """The data module's ``check()`` failed: a missing path, an unreadable dataset (``distnn-train``
    prints the message once, without a traceback)."""


def check_data(datamodule: Any) -> None:
    """Run the data module's ``check()`` (missing files, bad paths) before any worker process starts."""
    check = getattr(datamodule, "check", None)
    if callable(check):
        try:
            check()
        except (FileNotFoundError, ValueError) as err:
            raise DataCheckError(str(err)) from err


def resolve_output_paths(cfg_strategy: Any, output_dir: Path) -> None:
    """Relative ``*_path`` options of the strategy (outputs such as ``gantt_path``) -> inside ``output_dir``."""
    if not isinstance(cfg_strategy, DictConfig):
        return
    with open_dict(cfg_strategy):
        for key in list(cfg_strategy.keys()):
            value = cfg_strategy.get(key)
            if str(key).endswith("_path") and isinstance(value, str) and value and not Path(value).is_absolute():
                cfg_strategy[key] = str(output_dir / value)


def describe_strategy(strategy: Any) -> str:
    """``strategy.describe()`` where the strategy has it (sync mode, compression, layout), else its class name."""
    describe = getattr(strategy, "describe", None)
    return str(describe()) if callable(describe) else type(strategy).__name__


def summary_notes(metrics: dict[str, Any], *, steps: int, model_params: int) -> list[str]:
    """What a reader of the summary table should know: a smoke-test run, a layout that sends mostly activations."""
    notes = []
    if steps < TOY_STEPS:
        notes.append(
            f"{steps} training steps: a smoke test (experiment=quick / trainer=toy), not meant to learn; "
            "its accuracy says nothing. The main job (distnn-train) trains 10 epochs to ~0.98 on digits."
        )
    world = int(metrics.get("world_size", 1))
    sent = max(metrics.get("bytes_sent_per_step", [0]) or [0])
    # bytes a ring all-reduce of the whole model's fp32 gradients sends per rank: data parallel's cost
    dp_bytes = 2 * (world - 1) / world * 4 * model_params if world > 1 else 0
    if dp_bytes and sent > 2 * dp_bytes:
        notes.append(
            f"the busiest rank sends {sent:,.0f} bytes/step, {sent / dp_bytes:.1f}x the {dp_bytes:,.0f} that data "
            "parallel's all-reduce of every gradient would: this layout moves activations (pipeline: every "
            "micro-batch's activation and its gradient at every stage cut; tensor parallel: an all-reduce at every "
            "sharded layer pair), which on a model this small costs more time than it saves. Data parallel "
            "(strategy=dp) is faster here; model parallelism pays off when the weights or activations do not fit "
            "one device (distnn-plan predicts which layout wins)."
        )
    return notes


def build_strategy(cfg_strategy: Any):
    """A strategy from a config node (``_target_``), a registered name, or None (Lightning's auto)."""
    if cfg_strategy is None:
        return "auto"
    if isinstance(cfg_strategy, str):
        return get_strategy(cfg_strategy) if cfg_strategy.startswith("distnn_") else cfg_strategy
    return hydra.utils.instantiate(cfg_strategy)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and summarise one run described by ``cfg``; returns the metrics (on every rank).

    The data module's ``check()`` runs first, so a missing dataset fails once, in the launching
    process, before Lightning starts the other ranks.
    """
    quiet_known_noise()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    check_data(datamodule)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    model_params = count_parameters(model)  # before any strategy shards it
    output_dir = Path(cfg.get("output_dir") or os.getcwd())
    resolve_output_paths(cfg.get("strategy"), output_dir)
    strategy = build_strategy(cfg.get("strategy"))
    stats = RunStats()
    callbacks: list[pl.Callback] = [stats]
    if cfg.get("fault_monitor", True):
        callbacks.append(FaultMonitor())  # a dead or hung rank: one message naming it, every process exits 1
    checkpoint_dir = Path(cfg.get("checkpoint_dir") or "checkpoints")
    if cfg.get("checkpoint_every_n_steps"):
        callbacks.append(ElasticCheckpoint(checkpoint_dir, every_n_steps=int(cfg.checkpoint_every_n_steps)))
    ckpt_path = resume_path(cfg.get("resume"), checkpoint_dir)
    logger = pl.loggers.CSVLogger(str(output_dir), name="csv", version="")
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=logger)
    if ckpt_path is not None and trainer.is_global_zero:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("run_test", True):
        for result in trainer.test(model, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    metrics.update(stats.stats)
    metrics["strategy"] = type(trainer.strategy).__name__
    metrics["strategy_description"] = describe_strategy(trainer.strategy)
    metrics["train_steps"] = int(trainer.global_step)
    if "comm_bytes_per_step" in metrics:
        metrics["bytes_sent_per_step"] = [
            r.get("sent", 0) + r.get("allreduce", 0) for r in metrics["comm_bytes_per_step"]
        ]
    if trainer.is_global_zero:
        summary = {
            "strategy": metrics["strategy_description"],
            "processes": trainer.world_size,
            "test acc": metrics.get("test/acc", math.nan),
            "images/s": metrics.get("images_per_s", math.nan),
            "params/rank": "; ".join(format_number(p) for p in metrics.get("params_per_rank", [])),
        }
        if "bytes_sent_per_step" in metrics:
            summary["bytes sent/step (max rank)"] = max(metrics["bytes_sent_per_step"])
        if "pipeline_bubble" in metrics:
            bubble = metrics["pipeline_bubble"][0]
            summary["bubble (measured / structural / theory)"] = " / ".join(
                f"{bubble.get(k, math.nan):.3f}" for k in ("measured", "structural", "theory")
            )
        notes = summary_notes(metrics, steps=metrics["train_steps"], model_params=model_params)
        strategy_note = getattr(trainer.strategy, "summary_note", lambda: None)()  # e.g. why a pipeline cannot pay off
        if strategy_note:
            notes.append(strategy_note)
            metrics["strategy_note"] = strategy_note
        print("\n" + format_table([summary]) + "\n" + "".join(f"note: {n}\n" for n in notes))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        log.info("metrics, Lightning's CSV log (csv/) and the Hydra config (.hydra/) are in %s", output_dir)
        saved = trainer.checkpoint_callback and (trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
        if saved and Path(saved).is_dir():
            log.info("checkpoint: %s, a distributed checkpoint (any layout resumes from it); "
                     "`distnn-checkpoint consolidate %s` writes it as one Lightning .ckpt file", saved, saved)
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
    """``distnn-train [overrides]``: compose ``conf/`` and run :func:`train` (a sweep with ``-m``)."""
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
    try:
        metrics = train(cfg)
    except DataCheckError as err:  # checked in the launching process: one message, no traceback
        raise SystemExit(f"error: {err}") from None
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
