"""A dead or frozen rank: diagnosis, one message, quiet exit, nothing left behind; sub-mesh group timeouts."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_distnn.faults import (
    Beat,
    FaultMonitor,
    Heartbeat,
    diagnose,
    kill_processes,
    process_state,
)
from lightning_distnn.testing import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_faults.py")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_process_state_and_sigkill_ends_a_stopped_process(sleeper):
    assert process_state(sleeper.pid) == "running"
    os.kill(sleeper.pid, signal.SIGSTOP)
    time.sleep(0.2)
    assert process_state(sleeper.pid) == "stopped"
    assert kill_processes([sleeper]) == [sleeper.pid]  # SIGTERM would stay pending on a stopped process
    assert sleeper.returncode == -signal.SIGKILL
    assert process_state(sleeper.pid) == "dead"


def _cluster(world, store=None):
    store = store or dist.HashStore()
    return [Heartbeat(store, rank=r, world_size=world, node=r // 2, interval=0.5) for r in range(world)]


def test_diagnose_names_the_stopped_rank_and_its_step(sleeper):
    hbs = _cluster(4)
    for hb in hbs:
        hb.step = 12
        hb.beat()
    # rank 3 is the stopped process on this host; ranks 0-2 saw the collective fail
    os.kill(sleeper.pid, signal.SIGSTOP)
    time.sleep(0.2)
    hbs[3].store.set("beat/3", Beat(3, 12, time.time() - 30, hbs[3].host, sleeper.pid, 1).to_bytes())
    for hb in hbs[:3]:
        hb.report_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:30372: "
                                       "Connection closed by peer. This is typically caused by ..."))
    report = diagnose(hbs[0])
    assert [r.state for r in report.ranks] == ["failed", "failed", "failed", "stopped"]
    msg = report.message()
    assert msg.startswith(f"rank 3 (node 1, host {hbs[0].host}, pid {sleeper.pid}) is stopped")
    assert "at step 12" in msg and "ranks 0, 1, 2 stopped with it" in msg
    assert "Connection closed by peer" in msg and "pair.cc" not in msg and "typically" not in msg
    assert "stopped" in str(report)  # the per-rank table


def test_diagnose_dead_local_and_silent_remote_ranks():
    hbs = _cluster(3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hbs[0].beat()
    hbs[1].store.set("beat/1", Beat(1, 7, time.time(), hbs[1].host, dead.pid, 0).to_bytes())
    hbs[2].store.set("beat/2", Beat(2, 7, time.time() - 60, "other-host", 4242, 1).to_bytes())
    hbs[0].report_failure("Connection closed by peer")
    report = diagnose(hbs[0])
    assert [r.state for r in report.ranks] == ["failed", "died", "silent"]
    assert "rank 1 (node 0" in report.message() and "died at step 7" in report.message()
    assert "rank 2 (node 1, host other-host, pid 4242) stopped answering at step 7" in report.message()


def test_diagnose_quotes_the_rank_that_raised_first():
    hbs = _cluster(2)
    for hb in hbs:
        hb.beat()
    hbs[1].report_failure(ValueError("label 11 at row 5 of data.db is outside num_classes=10"))
    hbs[0].report_failure(RuntimeError("Connection closed by peer"))
    msg = diagnose(hbs[0]).message()
    assert msg.startswith("rank 1 (node 0") and "failed at step 0: ValueError: label 11 at row 5" in msg
    assert hbs[0].claim_report() and not hbs[1].claim_report()  # one rank prints


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="grace=0"):
        FaultMonitor(grace=0)
    with pytest.raises(ValueError, match="hang_after='10'"):
        FaultMonitor(hang_after="10")
    with pytest.raises(ValueError, match="on_failure='quit'.*'exit'.*'raise'"):
        FaultMonitor(on_failure="quit")


def test_strategy_fault_monitor_argument_and_launcher_subclass():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from lightning_distnn.faults import attach_fault_monitor
    from lightning_distnn.strategies import DataParallelStrategy

    with pytest.raises(TypeError, match="fault_monitor='yes': pass True"):
        DataParallelStrategy(fault_monitor="yes")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DataParallelStrategy(fault_monitor=True), logger=False)
    launcher = trainer.strategy.launcher
    # our strategies replace Lightning's script launcher by a subclass (no instance of Lightning's is wrapped)
    assert isinstance(launcher, _SubprocessScriptLauncher) and type(launcher) is not _SubprocessScriptLauncher
    assert launcher.termination_delay == 5.0
    monitor = attach_fault_monitor(trainer, True)
    assert monitor.on_failure == "raise" and trainer.callbacks[0] is monitor
    assert attach_fault_monitor(trainer, FaultMonitor()) is monitor  # never two
    assert attach_fault_monitor(trainer, False) is None


def test_shared_store_warning():
    from lightning_distnn.elastic import shared_store_warning

    env = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning(env)
    assert shared_store_warning(dict(env, TORCHELASTIC_USE_AGENT_STORE="False")) is None
    assert shared_store_warning(dict(env, TORCHELASTIC_MAX_RESTARTS="0")) is None


def test_die_with_parent(tmp_path):
    pidfile = tmp_path / "child.pid"
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", '''
        import sys, time; sys.path.insert(0, {REPO!r})
        from lightning_distnn.faults import die_with_parent
        die_with_parent()
        import os, signal; open({str(pidfile)!r}, "w").write(str(os.getpid())); os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(600)
        '''])
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 120
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.2)
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert process_state(child) == "stopped"
    proc.kill()  # the launcher dies: its stopped child goes with it
    proc.wait()
    deadline = time.monotonic() + 10
    while process_state(child) != "dead":
        assert time.monotonic() < deadline, f"child {child} outlived its parent"
        time.sleep(0.1)


def _mesh_timeouts(rank, world_size):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_distnn.mesh import ParallelDims

    def timeout_of(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    plain = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    mesh = ParallelDims(dp=2, pp=2, tp=1, world_size=4).build_mesh("cpu", timeout=timedelta(seconds=3))
    out = {"plain": [timeout_of(plain.get_group(a)) for a in ("dp", "pp")],
           "ours": [timeout_of(mesh.get_group(a)) for a in ("dp", "pp")]}
    t = torch.ones(1)
    if rank == 1:
        time.sleep(12)  # frozen for its "pp" peer, rank 0
    elif rank == 0:
        start = time.monotonic()
        try:
            dist.all_reduce(t, group=mesh.get_group("pp"))
            out["error"] = None
        except RuntimeError as exc:
            out["error"] = str(exc)
        out["waited"] = time.monotonic() - start
    else:
        dist.all_reduce(t, group=mesh.get_group("pp"))
    return out


@pytest.mark.slow
def test_sub_mesh_groups_get_the_timeout():
    results = run_distributed(_mesh_timeouts, 4, init_process_group=True, pg_timeout=120, timeout=400)
    # torch's init_device_mesh: sub-mesh groups get gloo's default 30 minutes, not the world's 120 s
    assert results[0]["plain"] == [1800.0, 1800.0]
    assert all(r["ours"] == [3.0, 3.0] for r in results)
    assert results[0]["error"] is not None and "Timed out" in results[0]["error"]
    assert results[0]["waited"] < 3 + 10


def _run_victim(args, timeout=600, pgid=None):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, BENCH, "victim", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if pgid is not None:
        pgid.append(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, time.monotonic() - start


def _signal_time(out):
    for line in out.splitlines():
        if line.startswith("[victim]") and " t=" in line:
            return float(line.rsplit("t=", 1)[1])
    raise AssertionError(f"the victim never fired:\n{out[-3000:]}")


def _pids_of(out):
    return [int(w.split()[0]) for w in out.split(" pid ")[1:] if w.split()[0].isdigit()]


def _group_gone(pgid, wait=5.0):
    """True when no process of the job's process group (the launcher and every rank it started) is left."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, sig, victim, mode", [
    ("dp", "KILL", 1, "--monitor"), ("dp", "STOP", 1, "--raise"), ("hybrid", "STOP", 3, "--monitor")],
    ids=["dp-KILL", "dp-STOP-fault_monitor=True", "hybrid-dp2xpp2-STOP"])
def test_dead_or_frozen_rank_under_lightning_launcher(strategy, sig, victim, mode):
    # collective timeout 300 s (start-up on a loaded machine); a frozen rank is declared hung after 10 s.
    # hybrid: rank 3 is stage 1 of replica 1, so its peers wait on it in sub-mesh (pp and dp) groups.
    # --monitor: Trainer(callbacks=[FaultMonitor()]), every process exits 1. --raise: the strategy's
    # fault_monitor= argument with on_failure="raise": trainer.fit raises RankFailedError in the launching
    # process, which the script catches (exit code 3)
    pgid = []
    rc, out, _ = _run_victim(["--strategy", strategy, "--signal", sig, "--victim", str(victim), "--at-step", "3",
                              "--timeout", "300", mode, "--hang-after", "10"], pgid=pgid)
    ended = time.time()
    assert rc == (3 if mode == "--raise" else 1), out[-3000:]
    messages = [line for line in out.splitlines() if line.startswith("[distnn]")]
    assert len(messages) == 1, out[-3000:]
    if mode == "--raise":
        assert "[victim] rank 0 caught RankFailedError: [distnn] rank 1" in out, out[-3000:]
    verb = "died" if sig == "KILL" else "is stopped"
    assert messages[0].startswith(f"[distnn] rank {victim} (node 0") and verb in messages[0], messages
    assert "at step 3" in messages[0], messages
    assert "Traceback" not in out
    assert ended - _signal_time(out) < (10 if sig == "STOP" else 0) + 10 + 5  # +5: process exit on a busy machine
    for pid in _pids_of(out):
        assert process_state(pid) == "dead", f"pid {pid} left behind"
    assert _group_gone(pgid[0]), "a process of the job is left behind"


# ------------------------------------------------------------------------------------------- bad data
def _digits(n=32, size=8):
    from lightning_distnn.testing.equivalence import digits_tensors

    return digits_tensors(n, image_size=size)


def test_undecodable_image_named_at_construction(tmp_path):
    from lightning_distnn.data import ImageFolderDataset, export_image_folder

    x, y = _digits()
    root = export_image_folder(x, y, tmp_path / "images")
    victim = sorted((root / "3").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=rf"cannot be decoded, first: {victim}.*Remove or replace"):
        ImageFolderDataset(root, image_size=8)


def test_sqlite_label_outside_num_classes_names_the_row(tmp_path):
    import sqlite3

    from lightning_distnn.data import SQLiteDataset, write_sqlite

    x, y = _digits()
    path = write_sqlite(tmp_path / "d.sqlite", {"train": (x, y), "val": (x[:4], y[:4]), "test": (x[:4], y[:4])},
                        num_classes=10)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE samples SET label = 11 WHERE split = 'train' AND idx = 5")
    with pytest.raises(ValueError, match=r"row \(train, 5\) has label 11, outside num_classes=10"):
        SQLiteDataset(path, "train")
    SQLiteDataset(path, "val")  # the other splits are fine


def test_sqlite_missing_metadata(tmp_path):
    import sqlite3

    from lightning_distnn.data import SQLiteDataset, write_sqlite

    x, y = _digits()
    path = write_sqlite(tmp_path / "d.sqlite", {"train": (x, y), "val": (x[:4], y[:4]), "test": (x[:4], y[:4])},
                        num_classes=10)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key IN ('num_classes', 'splits')")
    with pytest.raises(ValueError, match=r"meta table lacks num_classes, splits .*distnn-to-sqlite"):
        SQLiteDataset(path, "train")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO meta VALUES ('num_classes', 'ten'), ('splits', '{}')")
    with pytest.raises(ValueError, match=r"unreadable values \(.*num_classes='ten'"):
        SQLiteDataset(path, "train")


def test_cifar_label_outside_classes_names_the_batch(tmp_path):
    import pickle

    import numpy as np

    from lightning_distnn.data.cifar10 import CIFAR10Batches

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        labels = [i % 10 for i in range(4)]
        if name == "data_batch_2":
            labels[2] = 12
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), dtype=np.uint8), "labels": labels}, f)
    with pytest.raises(ValueError, match=r"label 12 at .*data_batch_2 row 2 is outside num_classes=10"):
        CIFAR10Batches(tmp_path, train=True)


def test_model_with_fewer_classes_than_the_data_is_refused(tmp_path):
    import lightning.pytorch as pl

    from lightning_distnn.data import ImageFolderDataModule, export_image_folder
    from lightning_distnn.models import CaseStudyCNN, ImageClassifier

    x, y = _digits(48, size=16)
    root = export_image_folder(x, y, tmp_path / "images")  # 10 class folders
    model = ImageClassifier(CaseStudyCNN(conv_filters=4, fc_width=8, image_size=16, num_classes=5, in_channels=3),
                            num_classes=5)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"data has num_classes=10 .* model ImageClassifier has num_classes=5"):
        trainer.fit(model, ImageFolderDataModule(root=str(root), image_size=16, batch_size=4))


def test_rank_0_outlives_another_reporter():
    """Rank 0 may host the run's store: when it noticed the failure last and another rank reports, it stays
    until that report is printed (it used to exit at once, taking the store and the message with it)."""
    import threading

    from lightning_distnn.faults.monitor import handle_failure

    hbs = _cluster(3)
    for hb in hbs:
        hb.beat()
    hbs[2].store.set("beat/2", Beat(2, 4, time.time() - 60, "other-host", 4242, 1).to_bytes())
    assert hbs[1].claim_report()  # rank 1 noticed first and claimed the report
    left = {}

    def rank_0():
        handle_failure(hbs[0], RuntimeError("Connection closed by peer"), grace=0.1, exit=False)
        left["rank 0"] = hbs[0].reported()

    thread = threading.Thread(target=rank_0)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # waiting for the reporter, not gone with the store
    hbs[1].report_failure(RuntimeError("Connection closed by peer"))
    hbs[1].mark_reported()
    thread.join(timeout=5)
    assert not thread.is_alive() and left == {"rank 0": True}
