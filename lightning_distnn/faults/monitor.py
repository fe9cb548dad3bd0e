"""Ending a failed run: one message, children killed, quiet exit; :class:`FaultMonitor` for any Lightning strategy."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_distnn._compat import (
    delay_child_observer,
    launched_children,
    stand_down_observer,
    strategy_timeout_or_none,
)
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


def _await_report(heartbeat: Heartbeat, timeout: float) -> None:
    """Rank 0 when another rank claimed the report (rank 0 noticed the failure late, e.g. on a busy host):
    Lightning's launcher and torchrun's ``env://`` start the run's store in rank 0, so rank 0 stays (up to
    ``timeout`` s) until the reporter is done with it; otherwise the report dies with the store, unprinted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not heartbeat.reported():
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
            if not exit:
                report.ending = ("trainer.fit raises RankFailedError in the process you started; the others exit "
                                 "with code 1.")
            print(f"[distnn] {report.message()}", file=sys.stderr, flush=True)
            log.debug("fault report:\n%s", report)
            stopped_here = [c.pid for c in report.culprits if c.state == "stopped" and c.host == heartbeat.host]
            kill_processes(stopped_here)
            _await_exits(heartbeat, report, grace + 2.0)
            heartbeat.mark_reported()
        else:
            heartbeat.mark_exiting()
            if heartbeat.rank == 0:  # it may host the store the reporter still needs: leave after the report
                _await_report(heartbeat, grace + 10.0)
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


class RankFailedError(RuntimeError):
    """Raised by ``trainer.fit`` in the process the user started when a rank died or hung
    (``FaultMonitor(on_failure="raise")``, the strategies' ``fault_monitor=True``); ``report`` holds the
    per-rank diagnosis (:class:`FaultReport`), the message is its one line."""

    def __init__(self, message: str, report: Optional[FaultReport] = None) -> None:
        super().__init__(message)
        self.report = report


class FaultMonitor(Callback):
    """Heartbeat + one message + nothing left behind, for any strategy: ``Trainer(callbacks=[FaultMonitor()])``.

    Args:
        interval: seconds between heartbeats.
        grace: seconds a rank waits for the others to report before the message is printed.
        hang_after: (default: the strategy's collective ``timeout``) rank 0 declares a rank hung when its
            beat is that old, even where a collective would wait longer (a group with another timeout).
        on_failure: ``"exit"`` (default, what ``distnn-train`` uses): every process exits with code 1
            without a traceback (``os._exit``). ``"raise"``: the process the user started (rank 0 of
            Lightning's launcher) kills its children and ``trainer.fit`` raises :class:`RankFailedError`
            with the message, so code around ``fit`` can catch it; the other processes (Lightning's
            re-executed copies, or every rank under torchrun/SLURM, where no caller can unblock a rank
            stuck in a collective) still exit quietly.

    On every rank: beats each ``interval`` s with the current ``global_step``; a child process of a
    launcher asks to die with its parent. When a rank fails (``on_exception``), or a peer reported a
    failure while this rank is still blocked in a collective, :func:`handle_failure` runs: rank 0
    prints one line naming the dead or frozen rank and its step, the launching process SIGKILLs the
    children it started, and every process ends as ``on_failure`` says.
    """

    def __init__(
        self,
        *,
        interval: float = 0.5,
        grace: float = 2.0,
        hang_after: Optional[float] = None,
        on_failure: str = "exit",
    ) -> None:
        for name, value in (("interval", interval), ("grace", grace), ("hang_after", hang_after)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive number of seconds.")
        if on_failure not in ("exit", "raise"):
            raise ValueError(f"on_failure={on_failure!r}: use 'exit' (every process exits with code 1) or 'raise' "
                             "(trainer.fit raises RankFailedError in the process you started).")
        self.interval, self.grace, self.hang_after, self.on_failure = interval, grace, hang_after, on_failure
        self.heartbeat: Optional[Heartbeat] = None
        self.report: Optional[FaultReport] = None
        self._trainer = None
        self._raises = False
        self._once = threading.Lock()
        self._handled = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.heartbeat is not None or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() == 1:
            return
        # (not ``cluster_environment.creates_processes_externally``: Lightning's launcher sets LOCAL_RANK in its own
        # environment when it starts the children, after which every process of the run reads "external")
        launched = bool(launched_children(trainer.strategy))
        if not launched and ("TORCHELASTIC_RUN_ID" in os.environ or trainer.local_rank > 0):
            die_with_parent()  # a torchrun worker, or a child of Lightning's launcher (or of srun)
        if launched:
            delay_child_observer(trainer.strategy.launcher, self.grace + 3.0)
        self._raises = self.on_failure == "raise" and launched
        self._trainer = trainer
        self.heartbeat = Heartbeat(
            store_from_env(), rank=dist.get_rank(), world_size=dist.get_world_size(),
            node=trainer.node_rank, interval=self.interval,
        ).start()
        self.heartbeat.on_peer_failure = self._peer_failed
        timeout = self.hang_after if self.hang_after is not None else strategy_timeout_or_none(trainer.strategy)
        if timeout is not None:
            self.heartbeat.hang_after = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.heartbeat is not None and self.heartbeat.step != trainer.global_step:
            self.heartbeat.step = trainer.global_step
            self.heartbeat.beat()  # one store write per step (~0.1 ms on a LAN): the step is exact

    def _children(self) -> list:
        return launched_children(self._trainer.strategy) if self._trainer is not None else []

    def _handle(self, error) -> Optional[FaultReport]:
        with self._once:  # the heartbeat thread and the main thread may both see the failure: handle it once
            if self._handled:
                return self.report
            self._handled = True
            if self._raises:
                stand_down_observer()  # Lightning's observer must not kill this process: fit raises here
            self.report = handle_failure(self.heartbeat, error, grace=self.grace, children=self._children(),
                                         exit=not self._raises)
            return self.report

    def _peer_failed(self, heartbeat: Heartbeat, silent_rank: Optional[int]) -> None:
        if silent_rank is None:
            # give this rank's own collective the first chance to fail with its own (more precise) error
            time.sleep(self.grace)
            error = "stopped because a peer failed"
        else:
            error = f"rank {silent_rank} sent no heartbeat for {heartbeat.hang_after:.0f} s (peer hangs)"
        # "raise": the children are killed here, so the main thread's collective fails and on_exception raises
        self._handle(error)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.heartbeat is None:
            # failed before the heartbeat started (e.g. the rendezvous timed out): Lightning would leave the
            # children it launched running; end them
            kill_processes(launched_children(trainer.strategy))
            return
        if isinstance(exception, (KeyboardInterrupt, RankFailedError)):
            return
        self._handle(exception)
        if self._raises:
            self.heartbeat.stop()
            self.heartbeat = None
            report = self.report
            text = report.message() if report is not None else f"a rank failed: {exception}"
            raise RankFailedError(f"[distnn] {text}", report) from exception

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None


def attach_fault_monitor(trainer, fault_monitor: Union[bool, FaultMonitor, None]) -> Optional[FaultMonitor]:
    """What a strategy's ``fault_monitor`` argument does (called from its ``connect``): ``True`` adds a
    ``FaultMonitor(on_failure="raise")`` to ``trainer.callbacks``, an instance adds that one, ``False``/``None``
    nothing. A FaultMonitor the user already passed wins (never two)."""
    if fault_monitor is None or fault_monitor is False:
        return None
    present = [c for c in trainer.callbacks if isinstance(c, FaultMonitor)]
    if present:
        return present[0]
    monitor = FaultMonitor(on_failure="raise") if fault_monitor is True else fault_monitor
    trainer.callbacks.insert(0, monitor)  # first: its step is the one a later callback's failure happens at
    return monitor


def check_fault_monitor(value) -> None:
    """Refuse a ``fault_monitor`` strategy argument that is not a bool or a FaultMonitor (before any process starts)."""
    if not isinstance(value, (bool, FaultMonitor)) and value is not None:
        raise TypeError(f"fault_monitor={value!r}: pass True (one message naming a dead or hung rank; trainer.fit "
                        "raises RankFailedError), False, or a FaultMonitor(...) instance.")
