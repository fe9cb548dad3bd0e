"""Every config in conf/ composes and instantiates; the main job runs end to end at toy size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import get_strategy, registered_names
from lightning_distnn.train import CONF_DIR

GROUPS = ["model", "data", "strategy", "trainer"]


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_group_option_instantiates(group, option):
    cfg = _compose([f"{group}={option}"])
    extra = {"devices": 1, "strategy": "auto", "logger": False} if group == "trainer" else {}
    if group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        extra["accelerator"] = "cpu"  # the rest of a GPU trainer config still has to build
    obj = hydra.utils.instantiate(cfg[group], **extra)
    assert obj is not None


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    for group in ("model", "data"):
        assert hydra.utils.instantiate(cfg[group]) is not None
    OmegaConf.to_container(cfg, resolve=True)


def test_unknown_model_lists_options():
    with pytest.raises(Exception) as err:
        _compose(["model=resnet_9000"])
    assert "case_study" in str(err.value) and "seed_net" in str(err.value)


def test_unknown_strategy_name_lists_registered():
    with pytest.raises(ValueError) as err:
        get_strategy("distnn_nope")
    for name in registered_names():
        assert name in str(err.value)


def _run_cli(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "lightning_distnn.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_main_job_toy_size_one_run_dir(tmp_path):
    proc = _run_cli(["experiment=quick", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["strategy"] == "DataParallelStrategy" and metrics["world_size"] == 2
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["images_per_s"] > 0
    assert len(metrics["params_per_rank"]) == 2
    assert "| DataParallelStrategy | 2 |" in proc.stdout  # the summary table
    # one run directory, no stray per-rank directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_multirun_one_directory_per_job(tmp_path):
    proc = _run_cli(
        ["-m", "experiment=quick", "seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
