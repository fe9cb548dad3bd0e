"""Elastic resume: checkpoints every K steps, resume="auto", a node lost at step k, restart at world size 2."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_distnn.checkpoint import newest_complete_checkpoint, save_distributed
from lightning_distnn.elastic import ElasticCheckpoint, resume_path, steps_lost
from lightning_distnn.testing import free_port
from lightning_distnn.testing.cluster import unsupported_reason
from lightning_distnn.testing.equivalence import tiny_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_faults.py")


def test_resume_path(tmp_path):
    assert resume_path(None, tmp_path) is None and resume_path("never", tmp_path) is None
    assert resume_path("auto", tmp_path / "nothing-yet") is None  # a first start
    model = tiny_classifier(conv_filters=8, fc_width=16, image_size=16)
    save_distributed(tmp_path / "step-00000005", model, extra={"global_step": 5})
    save_distributed(tmp_path / "step-00000010", model, extra={"global_step": 10})
    assert resume_path("auto", tmp_path) == str(tmp_path / "step-00000010")
    assert resume_path(str(tmp_path / "step-00000005"), tmp_path) == str(tmp_path / "step-00000005")
    with pytest.raises(FileNotFoundError, match="resume='nope' does not exist"):
        resume_path("nope", tmp_path)
    assert steps_lost(13, 10) == 3 and steps_lost(4, None) == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_steps=0), "every_n_steps=0"),
    (dict(every_n_steps=2.5), "every_n_steps=2.5"),
    (dict(keep=0), "keep=0"),
])
def test_elastic_checkpoint_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElasticCheckpoint(tmp_path, **kwargs)


def _torchrun(nproc, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), BENCH, "elastic", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _field(out, pattern):
    match = re.search(pattern, out)
    assert match, f"{pattern!r} not in output:\n{out[-4000:]}"
    return match.group(1)


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_from(checkpoint, tmp_path, common):
    """A run started on 2 processes from ``checkpoint``: the weights the elastic restart must reach."""
    rc, out = _torchrun(2, "--dir", str(tmp_path / "ref-run"), "--resume", str(checkpoint),
                        "--out", str(tmp_path / "ref.pt"), *common)
    assert rc == 0, out[-4000:]
    return torch.load(tmp_path / "ref.pt")


def _assert_exact(got, want):
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # exact


K, KILL_AT, STEPS = 5, 13, 24


@pytest.mark.slow
@pytest.mark.skipif(unsupported_reason() is not None, reason=f"simulated cluster: {unsupported_reason()}")
def test_torchrun_restarts_the_survivors_after_a_node_is_lost(tmp_path):
    """2 simulated nodes x 2 processes, each node its own torchrun agent (elastic rendezvous, --nnodes 1:2,
    --max-restarts 1); node 1 (agent and workers) is killed at step 13. Node 0's agent restarts its workers by
    itself at world size 2; they resume from the newest complete checkpoint (step 10) and finish."""
    run = tmp_path / "run"
    common = ["--every", str(K), "--steps", str(STEPS), "--timeout", "300"]
    result = _load_bench().cluster_node_loss(
        ["--dir", str(run), "--kill-at", str(KILL_AT), "--out", str(tmp_path / "elastic.pt"), *common],
        workdir=str(tmp_path), timeout=600)
    survivor, lost_node = result["out"]
    assert result["rc"][0] == 0, survivor[-4000:]
    assert result["rc"][1] != 0 and f"dies at step {KILL_AT}" in lost_node, lost_node[-4000:]
    assert "world 4: resume from None (restart 0)" in survivor
    resumed = _field(survivor, r"\[elastic\] world 2: resume from (\S+) \(restart 1\)")
    assert resumed == str(run / "step-00000010")
    messages = [line for line in survivor.splitlines() if line.startswith("[distnn]")]
    assert len(messages) == 1 and "(node 1, " in messages[0] and f"died at step {KILL_AT}" in messages[0], survivor
    lost = steps_lost(KILL_AT, 10)
    print(f"steps lost: {lost} (K={K})")
    assert lost <= K
    assert _field(survivor, r"\[elastic\] done (\d+) steps") == str(STEPS)
    _assert_exact(torch.load(tmp_path / "elastic.pt"), _reference_from(resumed, tmp_path, common))


@pytest.mark.slow
@pytest.mark.skipif(unsupported_reason() is None, reason="the simulated cluster runs the automatic restart instead")
def test_node_lost_restart_by_hand_matches_run_from_same_checkpoint(tmp_path):
    """Without namespaces (no root): one host, the job that lost "node 1" is restarted by hand on 2 processes."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = ["--every", str(K), "--steps", str(STEPS), "--timeout", "300"]
    # attempt 1: 2 nodes x 2 processes; node 1 dies at step 13
    rc, out = _torchrun(4, "--dir", str(run), "--kill-node", "1", "--kill-at", str(KILL_AT), "--ranks-per-node", "2",
                        *common)
    assert rc != 0 and f"node 1 dies at step {KILL_AT}" in out, out[-4000:]
    newest = newest_complete_checkpoint(run)
    assert newest is not None and newest.name == "step-00000010", sorted(p.name for p in run.iterdir())
    shutil.copytree(newest, ref / newest.name)
    # attempt 2: the survivors (2 processes) resume by themselves from the newest complete checkpoint
    rc, out = _torchrun(2, "--dir", str(run), "--out", str(tmp_path / "elastic.pt"), *common)
    assert rc == 0, out[-4000:]
    resumed = _field(out, r"\[elastic\] world 2: resume from (\S+)")
    assert resumed == str(run / "step-00000010")
    lost = steps_lost(KILL_AT, 10)
    print(f"steps lost: {lost} (K={K})")
    assert lost <= K
    assert _field(out, r"\[elastic\] done (\d+) steps") == str(STEPS)
    _assert_exact(torch.load(tmp_path / "elastic.pt"), _reference_from(ref / newest.name, tmp_path, common))


@pytest.mark.parametrize("async_save", [True, False])
def test_checkpoints_every_k_steps_keep_the_newest(tmp_path, async_save):
    import lightning.pytorch as pl

    from lightning_distnn.checkpoint import load_distributed, scan_checkpoints
    from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors

    ckpt = ElasticCheckpoint(tmp_path, every_n_steps=2, keep=2, async_save=async_save)
    x, y = digits_tensors(64)
    model = tiny_classifier(conv_filters=8, fc_width=16, image_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=7, callbacks=[ckpt], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, FixedDataModule(x, y, batch_size=8))
    assert ckpt.saved_steps == [2, 4, 6]
    statuses = scan_checkpoints(tmp_path)
    assert [(s.path.name, s.step, s.complete) for s in statuses] == [
        ("step-00000006", 6, True), ("step-00000004", 4, True)]
    assert not list(tmp_path.glob(".*"))  # no partial directory left
    meta = load_distributed(tmp_path / "step-00000006", tiny_classifier(seed=1, conv_filters=8, fc_width=16,
                                                                        image_size=16))
    assert meta["global_step"] == 6 and "loops" in meta
