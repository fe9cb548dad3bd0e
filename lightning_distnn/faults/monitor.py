"""Ending a failed run: one message, children killed, quiet exit; :class:`FaultMonitor` for any Lightning strategy."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_distnn._compat import delay_lightning_observer
from lightning_distnn.faults.heartbeat import FaultReport, Heartbeat, diagnose, store_from_env
from lightning_distnn.faults.process import die_with_parent, exit_quietly, kill_processes

log = logging.getLogger(__name__)

# -- ending a failed run ---------------------------------------------------------------------------
_handling = threading.Lock()


def _settle(heartbeat: Heartbeat, grace: float) -> None:
    """Wait up to ``grace`` s until every other rank reported a failure, died or is stopped."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        report = diagnose(heartbeat)
        if all(r.state in ("failed", "died", "stopped") for r in report.ranks):
            return
        time.sleep(0.2)


def _await_exits(heartbeat: Heartbeat, report: FaultReport, timeout: float) -> None:
    """The reporter leaves last (up to ``timeout`` s): it may host the run's store (rank 0 of a launcher), and a
    rank still reading it when it goes prints C++ store warnings instead of exiting quietly."""
    waiting = {r.rank for r in report.ranks if not r.culprit} - {heartbeat.rank}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting -= heartbeat.exited()
        time.sleep(0.1)


def handle_failure(
    heartbeat: Heartbeat,
    error: BaseException | str,
    *,
    grace: float = 2.0,
    children: Sequence = (),
    exit_code: int = 1,
    exit: bool = True,
) -> Optional[FaultReport]:
    """Record this rank's failure, let one rank print the one message, kill ``children``, exit quietly.

    Rank 0 reports when it is alive (the others wait 2 s longer before claiming the report). The reporter
    also SIGKILLs culprits that are stopped on its own host. With ``exit=False`` it returns the report
    (rank that printed) or None instead of exiting (for tests).
    """
    if not _handling.acquire(blocking=False):  # the heartbeat thread and the main thread both failed
        while exit:
            time.sleep(60)
        return None
    report = None
    try:
        heartbeat.report_failure(error)
        _settle(heartbeat, grace if heartbeat.rank == 0 else grace + 2.0)
        if heartbeat.claim_report():
            report = diagnose(heartbeat)
            print(f"[distnn] {report.message()}", file=sys.stderr, flush=True)
            log.debug("fault report:\n%s", report)
            stopped_here = [c.pid for c in report.culprits if c.state == "stopped" and c.host == heartbeat.host]
            kill_processes(stopped_here)
            _await_exits(heartbeat, report, grace + 2.0)
        else:
            heartbeat.mark_exiting()
    except Exception as exc:  # noqa: BLE001 - the store may be gone with its host; still end quietly
        if heartbeat.rank == 0 and isinstance(exc, (dist.DistStoreError, ConnectionError, TimeoutError)):
            print(f"[distnn] rank 0 failed ({error}); the run's store is unreachable ({exc}).", file=sys.stderr)
        else:
            log.debug("fault report of rank %d failed: %r", heartbeat.rank, exc)
    finally:
        kill_processes(children)
        if exit:
            exit_quietly(exit_code)
        _handling.release()
    return report


class FaultMonitor(Callback):
    """Heartbeat + one message + quiet exit for any strategy: ``Trainer(callbacks=[FaultMonitor()])``.

    ``hang_after`` (default: the strategy's collective ``timeout``): rank 0 declares a rank hung when
    its beat is that old, even where a collective would wait longer (a group with another timeout).

    On every rank: beats each ``interval`` s with the current ``global_step``; a child process of a
    launcher asks to die with its parent. When a rank fails (``on_exception``), or a peer reported a
    failure while this rank is still blocked in a collective, :func:`handle_failure` runs: rank 0
    prints one line naming the dead or frozen rank and its step, the launching process SIGKILLs the
    children it started, and every process exits with code 1 without a traceback.
    """

    def __init__(
        self,
        *,
        interval: float = 0.5,
        grace: float = 2.0,
        hang_after: Optional[float] = None,
        exit_on_failure: bool = True,
    ) -> None:
        for name, value in (("interval", interval), ("grace", grace), ("hang_after", hang_after)):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive number of seconds.")
        self.interval, self.grace, self.hang_after, self.exit_on_failure = interval, grace, hang_after, exit_on_failure
        self.heartbeat: Optional[Heartbeat] = None
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.heartbeat is not None or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() == 1:
            return
        env = trainer.strategy.cluster_environment
        external = env is None or env.creates_processes_externally
        if "TORCHELASTIC_RUN_ID" in os.environ or (not external and trainer.local_rank > 0):
            die_with_parent()
        if trainer.global_rank == 0 and not external:
            delay_lightning_observer(self.grace + 3.0)
        self._trainer = trainer
        self.heartbeat = Heartbeat(
            store_from_env(), rank=dist.get_rank(), world_size=dist.get_world_size(),
            node=trainer.node_rank, interval=self.interval,
        ).start()
        self.heartbeat.on_peer_failure = self._peer_failed
        timeout = self.hang_after if self.hang_after is not None else getattr(trainer.strategy, "_timeout", None)
        if timeout is not None:
            self.heartbeat.hang_after = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.heartbeat is not None and self.heartbeat.step != trainer.global_step:
            self.heartbeat.step = trainer.global_step
            self.heartbeat.beat()  # one store write per step (~0.1 ms on a LAN): the step is exact

    def _children(self) -> list:
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        return list(getattr(launcher, "procs", []) or [])

    def _peer_failed(self, heartbeat: Heartbeat, silent_rank: Optional[int]) -> None:
        if silent_rank is None:
            # give this rank's own collective the first chance to fail with its own (more precise) error
            time.sleep(self.grace)
            error = "stopped because a peer failed"
        else:
            error = f"rank {silent_rank} sent no heartbeat for {heartbeat.hang_after:.0f} s (peer hangs)"
        handle_failure(heartbeat, error, grace=self.grace, children=self._children(), exit=self.exit_on_failure)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.heartbeat is None:
            # failed before the heartbeat started (e.g. the rendezvous timed out): Lightning would leave the
            # children it launched running; end them
            launcher = getattr(trainer.strategy, "launcher", None)
            kill_processes(list(getattr(launcher, "procs", []) or []))
            return
        if isinstance(exception, KeyboardInterrupt):
            return
        handle_failure(self.heartbeat, exception, grace=self.grace, children=self._children(),
                       exit=self.exit_on_failure)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
