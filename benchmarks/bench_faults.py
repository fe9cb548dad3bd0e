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
    callbacks = [FaultMonitor(grace=args.grace)] if args.monitor else []
    callbacks.append(Saboteur(args.victim, getattr(signal, f"SIG{args.signal}"), args.at_step))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=make_strategy(args.strategy, args.timeout), max_steps=args.steps,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(tiny_classifier(), FixedDataModule(x, y, batch_size=8))
    print(f"[victim] rank {trainer.global_rank} finished {trainer.global_step} steps", flush=True)


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
    v.set_defaults(fn=victim)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
