"""Faults: a rank killed or frozen mid-training, elastic resume, async vs synchronous checkpoints.

Commands (one machine; every run is 2-4 gloo processes and a tiny CNN on digits)::

    # a dead (KILL) or frozen (STOP) rank, under Lightning's launcher (devices=N re-executes this script)
    python benchmarks/bench_faults.py victim --strategy dp --signal KILL --victim 1 --at-step 3 --timeout 20 [--monitor]
    # the same under torchrun
    torchrun --nproc-per-node 2 benchmarks/bench_faults.py victim --strategy dp --signal STOP --monitor
    # the benchmark: node death -> training again on the survivors (K = 10, 50), async vs sync save. As root with
    # iproute2 the node part runs on the simulated cluster (2 namespaced nodes, a torchrun agent each, the
    # survivor's agent restarts its workers: --max-restarts 1); elsewhere the survivors are restarted by hand
    python benchmarks/bench_faults.py bench

``victim`` prints ``[victim] ...`` lines; with ``--monitor`` the run uses
:class:`lightning_distnn.faults.FaultMonitor` (heartbeat, one message, quiet exit, children killed).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

STRATEGY_WORLD = {"dp": 2, "ps": 2, "ps_async": 2, "local_sgd": 2, "feature": 2, "pipeline": 2, "tp": 2, "hybrid": 4,
                  "ddp": 2}


def make_strategy(name: str, timeout: float, **kwargs):
    from lightning_distnn.strategies import (
        DataParallelStrategy,
        FeatureParallelStrategy,
        HybridStrategy,
        LocalSGDStrategy,
        ParameterServerStrategy,
        PipelineStrategy,
        TensorParallelStrategy,
    )

    if name == "ddp":
        from datetime import timedelta

        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(timeout=timedelta(seconds=timeout))
    return {
        "dp": lambda: DataParallelStrategy(timeout=timeout, **kwargs),
        "ps": lambda: ParameterServerStrategy(timeout=timeout, **kwargs),
        "ps_async": lambda: ParameterServerStrategy(timeout=timeout, ps_mode="async", **kwargs),
        "local_sgd": lambda: LocalSGDStrategy(timeout=timeout, local_sgd_period=1, **kwargs),
        "feature": lambda: FeatureParallelStrategy(timeout=timeout, **kwargs),
        "pipeline": lambda: PipelineStrategy(timeout=timeout, microbatches=2, **kwargs),
        "tp": lambda: TensorParallelStrategy(timeout=timeout, **kwargs),
        "hybrid": lambda: HybridStrategy(dp=2, pp=2, timeout=timeout, microbatches=2, **kwargs),
    }[name]()


class Saboteur(pl.Callback):
    """Sends ``sig`` to this process on rank ``victim`` when ``global_step`` reaches ``at_step``."""

    def __init__(self, victim: int, sig: int, at_step: int) -> None:
        self.victim, self.sig, self.at_step = victim, sig, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.victim and trainer.global_step == self.at_step:
            print(f"[victim] rank {self.victim} pid {os.getpid()} sends itself SIG{signal.Signals(self.sig).name[3:]} "
                  f"at step {self.at_step} t={time.time():.3f}", flush=True)
            os.kill(os.getpid(), self.sig)


def victim(args) -> None:
    import lightning_distnn  # noqa: F401 - registers the strategies
    from lightning_distnn.faults import FaultMonitor, RankFailedError
    from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, tiny_classifier

    world = STRATEGY_WORLD[args.strategy]
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if torchrun and int(os.environ["WORLD_SIZE"]) != world:
        raise SystemExit(f"--strategy {args.strategy} runs on {world} processes, torchrun gave {os.environ['WORLD_SIZE']}")
    torch.set_num_threads(1)
    x, y = digits_tensors(512)
    monitor = FaultMonitor(grace=args.grace, hang_after=args.hang_after,
                           on_failure="raise" if args.raise_ else "exit") if args.monitor or args.raise_ else None
    callbacks = [monitor] if monitor is not None and not args.raise_ else []
    callbacks.append(Saboteur(args.victim, getattr(signal, f"SIG{args.signal}"), args.at_step))
    kwargs = {"fault_monitor": monitor} if args.raise_ else {}  # the strategy argument adds it
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=make_strategy(args.strategy, args.timeout, **kwargs),
        max_steps=args.steps, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    if args.strategy == "feature":
        from lightning_distnn.models import SplitClassifier

        torch.manual_seed(0)
        model = SplitClassifier(parts=world, sample_shape=(3, 16, 16), width=4, embed_dim=8, top_width=16)
    else:
        model = tiny_classifier()
    try:
        trainer.fit(model, FixedDataModule(x, y, batch_size=8))
    except RankFailedError as err:  # on_failure="raise": the process the user started gets the message
        print(f"[victim] rank {trainer.global_rank} caught RankFailedError: {str(err)[:80]}...", flush=True)
        raise SystemExit(3)
    print(f"[victim] rank {trainer.global_rank} finished {trainer.global_step} steps", flush=True)


class NodeKiller(pl.Callback):
    """At ``at_step``, every rank of node ``node`` SIGKILLs its torchrun agent and itself: a lost machine.

    It first waits (up to 120 s) until the newest checkpoint in flight is complete, so the loss is the
    steps since the last checkpoint (a node lost while a save is in flight loses up to 2K steps).
    """

    def __init__(self, node: int, at_step: int, ckpt, ranks_per_node: int) -> None:
        self.node, self.at_step, self.ckpt, self.ranks_per_node = node, at_step, ckpt, ranks_per_node

    def _doomed(self, trainer) -> bool:
        if self.node < 0:  # the node whose environment says so (the simulated cluster's node that dies)
            return os.environ.get("DISTNN_DOOMED_NODE") == "1"
        return trainer.global_rank // self.ranks_per_node == self.node

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        if self._doomed(trainer):
            from lightning_distnn.checkpoint import newest_complete_checkpoint

            want = self.ckpt.saved_steps[-1] if self.ckpt.saved_steps else None
            deadline = time.monotonic() + 120
            while want is not None and time.monotonic() < deadline:
                found = newest_complete_checkpoint(self.ckpt.dirpath, verify=False)
                if found is not None and found.name == f"step-{want:08d}":
                    break
                time.sleep(0.1)
            who = os.environ.get("DISTNN_NODE_ADDR", self.node)
            print(f"[elastic] node {who} dies at step {self.at_step} t={time.time():.3f}", flush=True)
            if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("DISTNN_KILL_AGENT") == "1":
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


class FirstStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not getattr(self, "_done", False) and trainer.is_global_zero:
            self._done = True
            print(f"[elastic] training at step {trainer.global_step} on {trainer.world_size} processes "
                  f"t={time.time():.3f}", flush=True)


def elastic(args) -> None:
    """One attempt of an elastic run under torchrun: resume="auto", checkpoint every K steps, maybe lose a node."""
    import lightning_distnn  # noqa: F401
    from lightning_distnn.elastic import ElasticCheckpoint, resume_path
    from lightning_distnn.faults import FaultMonitor
    from lightning_distnn.strategies import DataParallelStrategy
    from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, tiny_classifier

    torch.set_num_threads(1)
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    ckpt = ElasticCheckpoint(args.dir, every_n_steps=args.every, keep=args.keep, async_save=not args.sync_save)
    callbacks = [FaultMonitor(), FirstStep()] + ([] if args.no_checkpoints else [ckpt])
    if args.kill_node is not None and world > args.min_world:
        callbacks.append(NodeKiller(args.kill_node, args.kill_at, ckpt, args.ranks_per_node or local))
    x, y = digits_tensors(args.samples)
    trainer = pl.Trainer(
        accelerator="cpu", devices=local, num_nodes=world // local, strategy=DataParallelStrategy(timeout=args.timeout),
        max_steps=args.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    start = resume_path(args.resume if args.resume != "auto" else "auto", args.dir)
    if trainer.is_global_zero:
        print(f"[elastic] world {world}: resume from {start} (restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)})",
              flush=True)
    fit_start = time.perf_counter()
    model = tiny_classifier(conv_filters=args.conv_filters, fc_width=args.fc_width, image_size=16)
    trainer.fit(model, FixedDataModule(x, y, batch_size=args.batch), ckpt_path=start)
    if trainer.is_global_zero:
        print(f"[elastic] done {trainer.global_step} steps t={time.time():.3f} saves={len(ckpt.blocked_s)} "
              f"blocked_ms_per_save={1000 * sum(ckpt.blocked_s) / max(len(ckpt.blocked_s), 1):.2f} "
              f"fit_s={time.perf_counter() - fit_start:.3f}", flush=True)
        if args.out:
            torch.save({k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}, args.out)


def _torchrun(nproc: int, args_list, env, log_path: str, timeout: float) -> int:
    from lightning_distnn.testing import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), os.path.abspath(__file__), "elastic", *args_list]
    with open(log_path, "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode


def _times(log: str, pattern: str) -> list[tuple[str, float]]:
    return [(m.group(1), float(m.group(2))) for m in re.finditer(pattern, log)]


def bench_node_loss(every: int, workdir: str, timeout: float = 900) -> dict:
    """2 nodes x 2 processes; node 1 dies at step 2.8K. On the simulated cluster (root + iproute2) each node runs
    its own torchrun agent and node 0's agent restarts its workers by itself (``--max-restarts 1``); elsewhere
    the survivors' job (2 processes, ``resume="auto"``) is started by hand the moment the first has exited."""
    from lightning_distnn.testing.cluster import unsupported_reason

    kill_at = 2 * every + (4 * every) // 5
    steps = kill_at + every
    run_dir = os.path.join(workdir, f"k{every}")
    common = ["--dir", run_dir, "--every", str(every), "--steps", str(steps), "--samples", "4096", "--timeout", "300"]
    if unsupported_reason() is None:
        logdir = os.path.join(workdir, f"k{every}-cluster")
        os.makedirs(logdir, exist_ok=True)
        res = cluster_node_loss(common + ["--kill-at", str(kill_at)], workdir=logdir, timeout=timeout)
        survivor, lost_node = res["out"]
        how, rc1, rc2, first, second = "torchrun agent (--max-restarts 1)", res["rc"][1], res["rc"][0], lost_node, survivor
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        logs = [os.path.join(workdir, f"k{every}-attempt{n}.log") for n in (1, 2)]
        rc1 = _torchrun(4, common + ["--kill-node", "1", "--kill-at", str(kill_at), "--ranks-per-node", "2"], env,
                        logs[0], timeout)
        rc2 = _torchrun(2, common, env, logs[1], timeout)
        first, second = (open(f).read() for f in logs)
        how = "by hand (no namespaces here)"
    death = _times(first, r"\[elastic\] node (\S+) dies at step \d+ t=([\d.]+)")
    starts = _times(second, r"\[elastic\] training at step (\d+) on 2 processes t=([\d.]+)")
    resumed = re.findall(r"\[elastic\] world 2: resume from \S*step-(\d+)", second)
    done = re.findall(r"\[elastic\] done (\d+) steps", second)
    if not death or not starts or not resumed or rc1 == 0:
        raise RuntimeError(f"K={every}: the run did not die and resume as planned (rc {rc1}, {rc2}):\n{second[-3000:]}")
    return {"K": every, "how": how, "killed_at": kill_at, "resumed_from": int(resumed[-1]),
            "lost": kill_at - int(resumed[-1]), "death_to_training_s": starts[-1][1] - death[0][1],
            "finished": done[-1] if done else "no", "rc": rc2}


def cluster_node_loss(args_list, *, workdir: str, procs_per_node: int = 2, max_restarts: int = 1,
                      timeout: float = 900, keep_alive: int = 1, last_call: int = 2) -> dict:
    """Two simulated nodes (network namespaces) x ``procs_per_node``, each with its own torchrun agent under
    elastic rendezvous (``--rdzv-backend c10d --nnodes 1:2 --max-restarts N``); the ``elastic`` attempt runs
    with ``args_list`` and node 1 marked as the one that dies (``--kill-node -1``).

    Node 0's agent hosts the c10d rendezvous store (``is_host=1``): torch's c10d backend keeps the
    rendezvous in that agent's process, so only a node other than the store's host can be lost (use etcd or
    a separate store for that). ``keep_alive`` x 3 s after its last keep-alive the dead agent is dropped
    from the rendezvous; ``last_call`` s later the survivor's new round closes at 1 node. Returns each node's
    exit code and output and when node 0's torchrun ended.
    """
    from lightning_distnn.testing import free_port
    from lightning_distnn.testing.cluster import SimulatedCluster
    from lightning_distnn.testing.cluster_netns import _terminate

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # torchrun's agents share one TCPStore with their workers across restarts, without a prefix per attempt: a
    # restarted worker can read the gloo addresses of the attempt before ("Connection refused" in new_group).
    # A store per attempt (rank 0's worker hosts it) avoids that; see docs/faults.md.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    port, run_id = free_port(), f"elastic{os.getpid()}"
    with SimulatedCluster(nodes=2, procs_per_node=procs_per_node) as cluster:
        endpoint = f"{cluster.plan.master_addr}:{port}"
        procs, logs = [], []
        for node in cluster.nodes:
            conf = (f"is_host={int(node.rank == 0)},last_call_timeout={last_call},keep_alive_interval={keep_alive},"
                    f"keep_alive_max_attempt=3")
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node",
                    str(procs_per_node), "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", conf,
                    "--local-addr", node.address, "--monitor-interval", "0.5",
                    os.path.abspath(__file__), "elastic", *args_list, "--kill-node", "-1"]
            log = os.path.join(workdir, f"node{node.rank}.log")
            logs.append(log)
            with open(log, "w") as fh:
                procs.append(cluster.popen(node.rank, argv, env=dict(env, DISTNN_DOOMED_NODE=str(node.rank), DISTNN_KILL_AGENT="1"),
                                           stdout=fh, stderr=subprocess.STDOUT))
            time.sleep(1.0)  # node 0's agent opens the rendezvous store first
        try:
            rc0 = procs[0].wait(timeout=timeout)
            ended = time.time()
            procs[1].wait(timeout=30)
        finally:
            for proc in procs:
                _terminate(proc)
    outputs = [open(log, errors="replace").read() for log in logs]
    return {"rc": [p.returncode for p in procs], "out": outputs, "ended": ended}


def bench_save(workdir: str, every: int = 5, steps: int = 40) -> dict:
    """2 processes (torchrun): training-loop time per checkpoint, async vs sync, and fit time vs no checkpoints."""
    from lightning_distnn.testing import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    for mode in ("none", "sync", "async"):
        args = ["--dir", os.path.join(workdir, f"save-{mode}"), "--every", str(every), "--steps", str(steps),
                "--samples", "2048", "--conv-filters", "64", "--fc-width", "1024", "--keep", "2"]
        args += {"none": ["--no-checkpoints"], "sync": ["--sync-save"], "async": []}[mode]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), os.path.abspath(__file__), "elastic", *args]
        log = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        m = re.search(r"saves=(\d+) blocked_ms_per_save=([\d.]+) fit_s=([\d.]+)", log.stdout + log.stderr)
        if not m:
            raise RuntimeError(f"save benchmark ({mode}) failed:\n{(log.stdout + log.stderr)[-3000:]}")
        out[mode] = {"saves": int(m.group(1)), "blocked_ms": float(m.group(2)), "fit_s": float(m.group(3))}
    return out


def bench_save_one_process(workdir: str, repeats: int = 5) -> dict:
    """One process, no Lightning: the call that blocks training, async (with background staging) vs sync."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from lightning_distnn.checkpoint import save_distributed, save_distributed_async
    from lightning_distnn.testing.equivalence import tiny_classifier

    torch.manual_seed(0)
    model = tiny_classifier(conv_filters=64, fc_width=1024, image_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 3, 16, 16)
    model(x).sum().backward()
    opt.step()
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=False))
    sync_ms, async_ms = [], []
    for i in range(repeats):
        start = time.perf_counter()
        future = save_distributed_async(os.path.join(workdir, f"one-async-{i}"), model, [opt], stager=stager)
        called = time.perf_counter()
        model(x).sum().backward()  # the next step's forward/backward overlaps the copy and the write
        waited = time.perf_counter()
        future.staged.result()  # before the optimizer step
        async_ms.append(1000 * (called - start + time.perf_counter() - waited))
        future.result()
        start = time.perf_counter()
        save_distributed(os.path.join(workdir, f"one-sync-{i}"), model, [opt])
        sync_ms.append(1000 * (time.perf_counter() - start))
    stager.close()
    params = sum(p.numel() for p in model.parameters())
    return {"sync_ms": sorted(sync_ms)[repeats // 2], "async_ms": sorted(async_ms)[repeats // 2], "params": params}


def bench(args) -> None:
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_faults_")
    print(f"# bench_faults (work dir {workdir}; 2 CPU gloo processes per node, tiny CNN)")
    if "save" in args.parts:
        one = bench_save_one_process(workdir)
        print(f"\none process, {one['params'] / 1e6:.2f} M parameters + momentum (median of 5): training blocked "
              f"{one['sync_ms']:.1f} ms by a synchronous save, {one['async_ms']:.1f} ms by an asynchronous one "
              f"(async/sync = {one['async_ms'] / one['sync_ms']:.2f})")
        res = bench_save(workdir)
        sync, asyn, none = res["sync"], res["async"], res["none"]
        print("\n| save | training loop blocked per checkpoint (ms) | ratio to sync | fit time (s) | ratio to no checkpoints |")
        print("|---|---|---|---|---|")
        for name, r in (("none", none), ("sync", sync), ("async", asyn)):
            ratio = r["blocked_ms"] / sync["blocked_ms"] if name != "none" else float("nan")
            print(f"| {name} | {r['blocked_ms']:.1f} | {ratio:.2f} | {r['fit_s']:.2f} | {r['fit_s'] / none['fit_s']:.2f} |")
        lost_sync = (sync["fit_s"] - none["fit_s"]) / max(sync["saves"], 1)
        lost_async = (asyn["fit_s"] - none["fit_s"]) / max(asyn["saves"], 1)
        print(f"\nfit time lost per checkpoint: sync {1000 * lost_sync:.1f} ms, async {1000 * lost_async:.1f} ms "
              f"(async/sync = {lost_async / lost_sync if lost_sync > 0 else float('nan'):.2f}); "
              f"{sync['saves']} checkpoints of a {64}-filter/{1024}-wide CNN")
    if "node" in args.parts:
        rows = [bench_node_loss(k, workdir) for k in args.every]
        print("\n| K | restart | node killed at step | resumed from | steps lost | death -> training on survivors (s) "
              "| steps done |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['K']} | {r['how']} | {r['killed_at']} | {r['resumed_from']} | {r['lost']} | "
                  f"{r['death_to_training_s']:.1f} | {r['finished']} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("victim", help="train and kill/stop one rank at a step")
    v.add_argument("--strategy", choices=sorted(STRATEGY_WORLD), default="dp")
    v.add_argument("--send", "--signal", dest="signal", choices=["KILL", "STOP"], default="KILL",
                   help="the signal the victim sends itself (--send under torchrun, whose --signals-to-handle clashes)")
    v.add_argument("--victim", type=int, default=1)
    v.add_argument("--at-step", type=int, default=3)
    v.add_argument("--steps", type=int, default=40)
    v.add_argument("--timeout", type=float, default=20.0)
    v.add_argument("--grace", type=float, default=2.0)
    v.add_argument("--fault-monitor", "--monitor", dest="monitor", action="store_true")
    v.add_argument("--hang-after", type=float, default=None, help="FaultMonitor(hang_after=...), default: timeout")
    v.add_argument("--raise", dest="raise_", action="store_true",
                   help="the strategy's fault_monitor= argument with FaultMonitor(on_failure='raise'): fit raises "
                        "RankFailedError in the launching process (which then exits with code 3)")
    v.set_defaults(fn=victim)
    e = sub.add_parser("elastic", help="one attempt of an elastic run (start it with torchrun)")
    e.add_argument("--dir", required=True, help="the run's checkpoint directory")
    e.add_argument("--every", type=int, default=5, help="K: checkpoint every K steps")
    e.add_argument("--keep", type=int, default=3)
    e.add_argument("--sync-save", action="store_true")
    e.add_argument("--steps", type=int, default=24)
    e.add_argument("--samples", type=int, default=512)
    e.add_argument("--batch", type=int, default=8, help="per-rank batch")
    e.add_argument("--timeout", type=float, default=120.0)
    e.add_argument("--resume", default="auto", help="'auto', 'never' or a checkpoint path")
    e.add_argument("--kill-node", type=int, default=None,
                   help="node index to kill (rank // ranks-per-node); -1: the node with DISTNN_DOOMED_NODE=1")
    e.add_argument("--kill-at", type=int, default=13)
    e.add_argument("--ranks-per-node", type=int, default=None, help="default: torchrun's LOCAL_WORLD_SIZE")
    e.add_argument("--min-world", type=int, default=2, help="no node is killed at this world size or below")
    e.add_argument("--conv-filters", type=int, default=8)
    e.add_argument("--fc-width", type=int, default=16)
    e.add_argument("--no-checkpoints", action="store_true", help="baseline: the same run without ElasticCheckpoint")
    e.add_argument("--out", default=None, help="rank 0 saves the final state dict here")
    e.set_defaults(fn=elastic)
    b = sub.add_parser("bench", help="the benchmark: node loss (K=10, 50) and async vs sync save")
    b.add_argument("--every", type=int, nargs="+", default=[10, 50])
    b.add_argument("--parts", nargs="+", default=["save", "node"], choices=["save", "node"])
    b.add_argument("--workdir", default=None)
    b.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
