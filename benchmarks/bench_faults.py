"""Faults: a rank killed or frozen mid-training, elastic resume, async vs synchronous checkpoints.

Commands (one machine; every run is 2-4 gloo processes and a tiny CNN on digits)::

    # a dead (KILL) or frozen (STOP) rank, under Lightning's launcher (devices=N re-executes this script)
    python benchmarks/bench_faults.py victim --strategy dp --signal KILL --victim 1 --at-step 3 --timeout 20 [--monitor]
    # the same under torchrun
    torchrun --nproc-per-node 2 benchmarks/bench_faults.py victim --strategy dp --signal STOP --monitor
    # the benchmark: node death -> training again on the survivors (K = 10, 50), async vs sync save
    python benchmarks/bench_faults.py bench

``victim`` prints ``[victim] ...`` lines; with ``--monitor`` the run uses
:class:`lightning_distnn.faults.FaultMonitor` (heartbeat, one message, quiet exit, children killed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

STRATEGY_WORLD = {"dp": 2, "ps": 2, "local_sgd": 2, "pipeline": 2, "tp": 2, "hybrid": 4, "ddp": 2}


def make_strategy(name: str, timeout: float):
    from lightning_distnn.strategies import (
        DataParallelStrategy,
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
        "dp": lambda: DataParallelStrategy(timeout=timeout),
        "ps": lambda: ParameterServerStrategy(timeout=timeout),
        "local_sgd": lambda: LocalSGDStrategy(timeout=timeout, local_sgd_period=1),
        "pipeline": lambda: PipelineStrategy(timeout=timeout, microbatches=2),
        "tp": lambda: TensorParallelStrategy(timeout=timeout),
        "hybrid": lambda: HybridStrategy(dp=2, pp=2, timeout=timeout, microbatches=2),
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
    from lightning_distnn.faults import FaultMonitor
    from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, tiny_classifier

    world = STRATEGY_WORLD[args.strategy]
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if torchrun and int(os.environ["WORLD_SIZE"]) != world:
        raise SystemExit(f"--strategy {args.strategy} runs on {world} processes, torchrun gave {os.environ['WORLD_SIZE']}")
    torch.set_num_threads(1)
    x, y = digits_tensors(512)
    callbacks = [FaultMonitor(grace=args.grace, hang_after=args.hang_after)] if args.monitor else []
    callbacks.append(Saboteur(args.victim, getattr(signal, f"SIG{args.signal}"), args.at_step))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=make_strategy(args.strategy, args.timeout), max_steps=args.steps,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(tiny_classifier(), FixedDataModule(x, y, batch_size=8))
    print(f"[victim] rank {trainer.global_rank} finished {trainer.global_step} steps", flush=True)


class NodeKiller(pl.Callback):
    """At ``at_step``, every rank of node ``node`` SIGKILLs its torchrun agent and itself: a lost machine.

    It first waits (up to 120 s) until the newest checkpoint in flight is complete, so the loss is the
    steps since the last checkpoint (a node lost while a save is in flight loses up to 2K steps).
    """

    def __init__(self, node: int, at_step: int, ckpt, ranks_per_node: int) -> None:
        self.node, self.at_step, self.ckpt, self.ranks_per_node = node, at_step, ckpt, ranks_per_node

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        if trainer.global_rank // self.ranks_per_node == self.node:
            from lightning_distnn.checkpoint import newest_complete_checkpoint

            want = self.ckpt.saved_steps[-1] if self.ckpt.saved_steps else None
            deadline = time.monotonic() + 120
            while want is not None and time.monotonic() < deadline:
                found = newest_complete_checkpoint(self.ckpt.dirpath, verify=False)
                if found is not None and found.name == f"step-{want:08d}":
                    break
                time.sleep(0.1)
            print(f"[elastic] node {self.node} dies at step {self.at_step} t={time.time():.3f}", flush=True)
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
    callbacks = [FaultMonitor(), ckpt, FirstStep()]
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
        print(f"[elastic] world {world}: resume from {start}", flush=True)
    trainer.fit(tiny_classifier(), FixedDataModule(x, y, batch_size=args.batch), ckpt_path=start)
    if trainer.is_global_zero:
        print(f"[elastic] done {trainer.global_step} steps t={time.time():.3f} blocked_ms_per_save="
              f"{1000 * sum(ckpt.blocked_s) / max(len(ckpt.blocked_s), 1):.2f}", flush=True)
        if args.out:
            torch.save({k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}, args.out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("victim", help="train and kill/stop one rank at a step")
    v.add_argument("--strategy", choices=sorted(STRATEGY_WORLD), default="dp")
    v.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    v.add_argument("--victim", type=int, default=1)
    v.add_argument("--at-step", type=int, default=3)
    v.add_argument("--steps", type=int, default=40)
    v.add_argument("--timeout", type=float, default=20.0)
    v.add_argument("--grace", type=float, default=2.0)
    v.add_argument("--monitor", action="store_true")
    v.add_argument("--hang-after", type=float, default=None, help="FaultMonitor(hang_after=...), default: timeout")
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
    e.add_argument("--kill-node", type=int, default=None)
    e.add_argument("--kill-at", type=int, default=13)
    e.add_argument("--ranks-per-node", type=int, default=None, help="default: torchrun's LOCAL_WORLD_SIZE")
    e.add_argument("--min-world", type=int, default=2, help="no node is killed at this world size or below")
    e.add_argument("--out", default=None, help="rank 0 saves the final state dict here")
    e.set_defaults(fn=elastic)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
