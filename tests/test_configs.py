"""Every config in conf/ composes and instantiates; the main job runs end to end at toy size."""

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lightning_distnn  # noqa: F401
from lightning_distnn.consolidate import default_output
from lightning_distnn.consolidate import main as consolidate_main
from lightning_distnn.strategies import get_strategy, registered_names
from lightning_distnn.train import (
    CONF_DIR,
    DataCheckError,
    quiet_known_noise,
    resolve_output_paths,
    summary_notes,
    train,
)

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


@pytest.mark.parametrize("experiment", _options("experiment"))
@pytest.mark.parametrize("data", _options("data"))
def test_every_data_option_with_every_experiment(data, experiment):
    """Issue 13: experiment=quick (and the case-study experiments) compose with every data= option."""
    cfg = _compose([f"data={data}", f"experiment={experiment}"])
    assert hydra.utils.instantiate(cfg.data).batch_size == cfg.data.batch_size
    assert hydra.utils.instantiate(cfg.model) is not None
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("model", _options("model"))
def test_quick_composes_with_every_model(model):
    cfg = _compose([f"model={model}", "experiment=quick"])
    assert hydra.utils.instantiate(cfg.model) is not None
    assert cfg.trainer.limit_train_batches == 4


def test_documented_overrides_exist_in_every_data_config():
    """data.drop_last / data.eval_batch_size on the command line need the key in every data config."""
    for data in _options("data"):
        cfg = _compose([f"data={data}", "data.drop_last=true", "data.eval_batch_size=64"])
        dm = hydra.utils.instantiate(cfg.data)
        assert dm.drop_last is True and dm.eval_batch_size == 64


def test_config_comment_lists_the_current_options():
    """conf/config.yaml's comment names every option of every group, and nothing that is gone."""
    text = (Path(CONF_DIR) / "config.yaml").read_text()
    for group in GROUPS + ["experiment"]:
        match = re.search(rf"^#\s+{group}=(\S+)$", text, flags=re.MULTILINE)
        assert match, f"conf/config.yaml: no '#   {group}=a|b|c' line in the comment"
        listed = match.group(1).split("|")
        assert sorted(listed) == _options(group), (
            f"conf/config.yaml lists {group}={'|'.join(listed)}, conf/{group}/ holds {_options(group)}: update the comment"
        )


def test_missing_dataset_fails_before_any_process(tmp_path):
    # one process: should the check ever be skipped, fit fails here instead of re-launching pytest as rank 1
    one = ["experiment=quick", "trainer.devices=1", "strategy=single", f"output_dir={tmp_path}"]
    cfg = _compose(["data=sqlite", f"data.path={tmp_path / 'missing.sqlite'}", *one])
    with pytest.raises(DataCheckError, match="missing.sqlite.*distnn-to-sqlite"):
        train(cfg)
    cfg = _compose(["data=cifar10", f"data.data_dir={tmp_path}", *one])
    with pytest.raises(DataCheckError, match="CIFAR-10 files missing"):
        train(cfg)
    assert not (tmp_path / "csv").exists()  # failed before the trainer existed


def test_relative_strategy_paths_land_in_the_run_dir(tmp_path):
    cfg = OmegaConf.create({"gantt_path": "gantt.png", "other": "x.png", "abs_path": "/tmp/a.png", "none_path": None})
    OmegaConf.set_struct(cfg, True)
    resolve_output_paths(cfg, tmp_path)
    assert cfg.gantt_path == str(tmp_path / "gantt.png")
    assert cfg.abs_path == "/tmp/a.png" and cfg.other == "x.png" and cfg.none_path is None


def test_summary_notes():
    toy = summary_notes({"world_size": 2, "bytes_sent_per_step": [557_096, 557_096]}, steps=4, model_params=139_274)
    assert len(toy) == 1 and "smoke test" in toy[0]
    # data parallel: ~ one ring all-reduce of the gradients, no note
    assert summary_notes({"world_size": 2, "bytes_sent_per_step": [557_096]}, steps=500, model_params=139_274) == []
    # tensor parallel on the same model: mostly activations
    (note,) = summary_notes({"world_size": 2, "bytes_sent_per_step": [5_000_000, 4_000_000]}, steps=500, model_params=139_274)
    assert "activations" in note and "strategy=dp" in note and "9.0x" in note


def test_quiet_known_noise(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        from torch.utils._pytree import LeafSpec

        LeafSpec()
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("\N{ELECTRIC LIGHT BULB} Tip: install something")
        rank_zero_info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_unknown_model_lists_options():
    with pytest.raises(Exception) as err:
        _compose(["model=resnet_9000"])
    assert "case_study" in str(err.value) and "seed_net" in str(err.value)


def test_unknown_strategy_name_lists_registered():
    with pytest.raises(ValueError) as err:
        get_strategy("distnn_nope")
    for name in registered_names():
        assert name in str(err.value)


def _run_cli(args, cwd, timeout=240, warnings_shown=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if warnings_shown:  # as a user sees them
        del env["PYTHONWARNINGS"]
    return subprocess.run(
        [sys.executable, "-m", "lightning_distnn.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_main_job_toy_size_one_run_dir(tmp_path):
    proc = _run_cli(["experiment=quick", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, warnings_shown=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["strategy"] == "DataParallelStrategy" and metrics["world_size"] == 2
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["images_per_s"] > 0
    assert len(metrics["params_per_rank"]) == 2
    assert f"| {metrics['strategy_description']} | 2 |" in proc.stdout  # the summary table
    assert "note: 4 training steps: a smoke test" in proc.stdout
    noise = proc.stdout + proc.stderr
    assert "Tip:" not in noise and "LeafSpec" not in noise and "log_every_n_steps" not in noise
    # one run directory, no stray per-rank directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # its checkpoint is a DCP directory: the log says how to make one Lightning file of it, and the
    # command builds the model from the run's config, so the file keeps the optimizer state
    (checkpoint,) = (tmp_path / "run" / "csv" / "checkpoints").iterdir()
    assert f"distnn-checkpoint consolidate {checkpoint}" in proc.stdout + proc.stderr
    assert consolidate_main(["consolidate", str(checkpoint)]) == 0
    saved = torch.load(default_output(checkpoint), weights_only=False)
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["num_classes"] == 10
    assert len(saved["optimizer_states"][0]["state"]) == len(saved["state_dict"]) == 16  # a momentum per parameter


@pytest.mark.slow
def test_missing_dataset_is_one_message(tmp_path):
    proc = _run_cli(["data=sqlite", "data.path=nowhere.sqlite", "experiment=quick", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("nowhere.sqlite does not exist") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "GLOBAL_RANK: 1" not in proc.stdout + proc.stderr


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
