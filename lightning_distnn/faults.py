"""A dead or hung rank: find it, say so once, end every process.

When a rank is killed (SIGKILL, a lost node) or stops answering (SIGSTOP, a hang), the other
ranks only see a raw gloo error ("Connection closed by peer [127.0.0.1]:30372") or a timeout, once
per rank, naming a port. This module turns that into one line on rank 0's log::

    [distnn] rank 3 (node 1, host n1, pid 4242) died at step 12; ranks 0, 1, 2 stopped with it
    (rank 0 saw: Connection closed by peer ...). Every process exits with code 1.

Pieces (the strategies compose them; :class:`FaultMonitor` does it for any Lightning strategy):

- :class:`Heartbeat`: a daemon thread per rank writes ``(step, time, host, pid, node)`` into the
  c10d store every ``interval`` seconds (it runs while the main thread blocks in a collective), and
  ranks that fail write a failure record.
- :func:`diagnose` reads them and says, per rank, whether it failed (saw the fault), died, is
  stopped, or went silent; :class:`FaultReport` formats the one message.
- :func:`exit_quietly` ends a process with a code and no traceback; :func:`die_with_parent` makes a
  child process die (SIGKILL) with the process that launched it; :func:`kill_processes` SIGKILLs
  children (a stopped process dies of SIGKILL too).
- :func:`build_mesh_with_timeout` / :func:`set_mesh_timeout`: every group of a DeviceMesh gets the
  configured timeout (torch's ``init_device_mesh`` creates sub-mesh groups with ``new_group(...,
  timeout=None)``, i.e. torch's default of 30 minutes for gloo, not the world group's timeout).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Iterable, Optional, Sequence

import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "Beat",
    "FaultReport",
    "Heartbeat",
    "RankState",
    "build_mesh_with_timeout",
    "diagnose",
    "die_with_parent",
    "exit_quietly",
    "kill_processes",
    "process_state",
    "set_mesh_timeout",
    "store_from_env",
]

PREFIX = "distnn_faults"


@dataclass(frozen=True)
class Beat:
    """One heartbeat: where a rank was (``step``) and when (``time``, seconds since the epoch)."""

    rank: int
    step: int
    time: float
    host: str
    pid: int
    node: int

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Beat":
        return cls(**json.loads(data))


def store_from_env(*, timeout: float = 10.0) -> dist.Store:
    """A client of the run's c10d store (``MASTER_ADDR``/``MASTER_PORT``, as torchrun and Lightning set them).

    Namespaced by the torchrun restart count, so records of an earlier attempt are not read as this one's.
    """
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: the heartbeat needs the run's c10d store; start the job with torchrun or "
            "Lightning's launcher (devices>1), or pass a store to Heartbeat(store=...)."
        )
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"{PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}", store)


class Heartbeat:
    """Per-rank heartbeat and failure records in a c10d store.

    Args:
        store: the run's store (every rank the same); :func:`store_from_env` gives one.
        rank, world_size: this process's global rank and the number of ranks.
        node: this process's node index (``NODE_RANK``/``GROUP_RANK``), for the message.
        interval: seconds between beats (a daemon thread writes them; set ``step`` from the training loop).
    """

    def __init__(
        self, store: dist.Store, *, rank: int, world_size: int, node: int = 0, interval: float = 0.5
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval={interval!r} must be a positive number of seconds, e.g. 0.5.")
        self.store, self.rank, self.world_size, self.node, self.interval = store, rank, world_size, node, interval
        self.step = 0
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # optional callable(heartbeat, silent_rank_or_None), called once from the thread when a peer reported a
        # failure, or (rank 0 only) when a rank's beat is older than ``hang_after`` seconds
        self.on_peer_failure = None
        self.hang_after: Optional[float] = None

    # -- writing --------------------------------------------------------------------------------------
    def beat(self) -> None:
        """Write this rank's beat now."""
        record = Beat(self.rank, int(self.step), time.time(), self.host, os.getpid(), self.node)
        with self._lock:
            self.store.set(f"beat/{self.rank}", record.to_bytes())

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread = threading.Thread(target=self._run, name="distnn-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the beats; a rank that finished is never declared hung."""
        self._stop.set()
        try:
            with self._lock:
                self.store.set(f"done/{self.rank}", b"1")
        except Exception:  # noqa: BLE001 - the store's host may already be gone at the end of a run
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)

    def _run(self) -> None:
        notified = False
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if notified or self.on_peer_failure is None:
                    continue
                if self.failures():
                    notified = True
                    self.on_peer_failure(self, None)
                elif self.hang_after is not None and self.rank == 0:
                    now = time.time()
                    for r, b in self.beats().items():
                        if b is not None and now - b.time > self.hang_after and self._get(f"done/{r}") is None:
                            notified = True
                            self.on_peer_failure(self, r)
                            break
            except Exception:  # noqa: BLE001 - the store is gone (its host died): nothing left to beat to
                return

    def report_failure(self, error: BaseException | str) -> None:
        """Record that this rank failed at its current step, with the first line of the error."""
        text = _first_sentence(str(error)) or type(error).__name__
        if isinstance(error, BaseException):
            text = f"{type(error).__name__}: {text}"
        payload = json.dumps({"step": int(self.step), "time": time.time(), "error": text}).encode()
        with self._lock:
            self.store.set(f"fail/{self.rank}", payload)
            self.store.add("fail_count", 1)

    def claim_report(self) -> bool:
        """True for exactly one caller per run: the rank that prints the message."""
        with self._lock:
            return self.store.compare_set("reporter", "", str(self.rank)) == str(self.rank).encode()

    # -- reading --------------------------------------------------------------------------------------
    def _get(self, key: str) -> Optional[bytes]:
        with self._lock:
            return self.store.get(key) if self.store.check([key]) else None

    def beats(self) -> dict[int, Optional[Beat]]:
        out = {}
        for r in range(self.world_size):
            data = self._get(f"beat/{r}")
            out[r] = Beat.from_bytes(data) if data is not None else None
        return out

    def failures(self) -> dict[int, dict]:
        with self._lock:
            if not self.store.check(["fail_count"]) or self.store.add("fail_count", 0) == 0:
                return {}
        out = {}
        for r in range(self.world_size):
            data = self._get(f"fail/{r}")
            if data is not None:
                out[r] = json.loads(data)
        return out


def _first_sentence(text: str) -> str:
    """The gist of an error: first line, without gloo's source-location prefix and its advice."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0]
    return text[:300]


def process_state(pid: int) -> str:
    """``"running"``, ``"stopped"`` (SIGSTOP/traced), ``"dead"`` (gone or a zombie) for a pid on this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "dead"
    except OSError:  # no /proc (not Linux): ask the kernel whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        return "running"
    return {"T": "stopped", "t": "stopped", "Z": "dead", "X": "dead"}.get(state, "running")


@dataclass
class RankState:
    """What one rank was doing when the job failed."""

    rank: int
    state: str  # failed | died | stopped | silent | running | unknown
    step: Optional[int]
    node: Optional[int]
    host: Optional[str]
    pid: Optional[int]
    detail: str = ""

    @property
    def culprit(self) -> bool:
        return self.state in ("died", "stopped", "silent", "unknown")

    def who(self) -> str:
        if self.pid is None:
            return f"rank {self.rank} (never sent a heartbeat)"
        return f"rank {self.rank} (node {self.node}, host {self.host}, pid {self.pid})"


@dataclass
class FaultReport:
    """Per-rank states and the one message that names the culprit(s)."""

    ranks: list[RankState]
    first_error: Optional[str] = None
    first_error_rank: Optional[int] = None
    culprits: list[RankState] = field(init=False)

    def __post_init__(self) -> None:
        self.culprits = [r for r in self.ranks if r.culprit]

    def __str__(self) -> str:
        rows = [f"{'rank':>4}  {'state':8}  {'step':>5}  {'node':>4}  {'pid':>7}  detail"]
        for r in self.ranks:
            rows.append(
                f"{r.rank:>4}  {r.state:8}  {'-' if r.step is None else r.step:>5}  "
                f"{'-' if r.node is None else r.node:>4}  {'-' if r.pid is None else r.pid:>7}  {r.detail}"
            )
        return "\n".join(rows)

    def message(self) -> str:
        failed = [r.rank for r in self.ranks if r.state == "failed"]
        saw = ""
        if self.first_error:
            saw = f" (rank {self.first_error_rank} saw: {self.first_error})"
        if self.culprits:
            verbs = {"died": "died", "stopped": "is stopped (SIGSTOP?) and stopped answering",
                     "silent": "stopped answering", "unknown": "stopped answering"}
            parts = [f"{c.who()} {verbs[c.state]} at step {c.step}{c.detail and f' ({c.detail})'}" for c in self.culprits]
            head = "; ".join(parts)
            plural = "ranks" if len(failed) > 1 else "rank"
            tail = f"; {plural} {_ranges(failed)} stopped with it{saw}" if failed else saw
            return f"{head}{tail}. Every process exits with code 1."
        if self.first_error_rank is not None:
            r = self.ranks[self.first_error_rank]
            return (
                f"{r.who()} failed at step {r.step}: {self.first_error}. The other ranks stopped with it. "
                "Every process exits with code 1."
            )
        return "a collective failed but no rank is missing or reported an error. Every process exits with code 1."


def _ranges(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


_COMM_WORDS = ("gloo", "connection closed", "timed out", "timeout", "nccl", "broken pipe", "connection reset", "peer")


def diagnose(heartbeat: Heartbeat, *, stale_after: Optional[float] = None, now: Optional[float] = None) -> FaultReport:
    """Read every rank's beat and failure record and classify the ranks.

    A rank that reported a failure is ``failed`` (it saw the fault). Otherwise, on this host its
    process is checked (``died`` / ``stopped``); elsewhere a beat older than ``stale_after`` seconds
    (default 4 heartbeat intervals) means ``silent``. The first error that is not a communication
    error (e.g. a ValueError raised by one rank's data) is the one quoted.
    """
    now = time.time() if now is None else now
    stale_after = 4 * heartbeat.interval if stale_after is None else stale_after
    beats, failures = heartbeat.beats(), heartbeat.failures()
    states = []
    for r in range(heartbeat.world_size):
        b = beats.get(r)
        step, node, host, pid = (b.step, b.node, b.host, b.pid) if b else (None, None, None, None)
        if r in failures:
            states.append(RankState(r, "failed", failures[r]["step"], node, host, pid, failures[r]["error"]))
            continue
        if b is None:
            states.append(RankState(r, "unknown", None, None, None, None, "no heartbeat"))
            continue
        age = now - b.time
        if b.host == heartbeat.host:
            proc = process_state(b.pid)
            state = {"dead": "died", "stopped": "stopped"}.get(proc, "silent" if age > stale_after else "running")
        else:
            state = "silent" if age > stale_after else "running"
        detail = f"last heartbeat {age:.1f} s ago" if state in ("silent", "stopped") else ""
        states.append(RankState(r, state, step, node, host, pid, detail))
    first_error, first_rank = None, None
    if failures:
        ordered = sorted(failures.items(), key=lambda kv: kv[1]["time"])
        own = [kv for kv in ordered if not any(w in kv[1]["error"].lower() for w in _COMM_WORDS)]
        first_rank, rec = (own or ordered)[0]
        first_error = rec["error"]
    return FaultReport(states, first_error, first_rank)


def exit_quietly(code: int = 1) -> None:
    """End this process now with ``code``: flush logs and streams, no traceback, no atexit hooks.

    (A process blocked in, or torn down after, a failed collective can hang in ``atexit`` /
    ``destroy_process_group``; ``os._exit`` does not.)
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    Call it early in a child the launcher started (Lightning's re-executed ranks, torchrun workers): if
    the launcher dies, nothing is left behind, stopped or not. Returns False where unsupported.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def kill_processes(procs: Iterable, sig: int = signal.SIGKILL) -> list[int]:
    """SIGKILL (or ``sig``) every process still alive in ``procs`` (``subprocess.Popen`` objects or pids).

    SIGKILL also ends a stopped (SIGSTOP) process, which SIGTERM would not. Returns the pids signalled.
    """
    signalled = []
    for proc in procs:
        pid = proc if isinstance(proc, int) else proc.pid
        if not isinstance(proc, int) and proc.poll() is not None:
            continue
        try:
            os.kill(pid, sig)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    for proc in procs:
        if not isinstance(proc, int):
            try:
                proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
    return signalled


def set_mesh_timeout(mesh, timeout: timedelta | float) -> None:
    """Give every process group of ``mesh`` (one per mesh axis) the collective ``timeout``.

    torch 2.14's ``DeviceMesh`` creates its per-axis groups with ``new_group(ranks, timeout=None)``
    unless a ``backend_override`` carries options, so they get torch's default (30 min for gloo, 10 for
    NCCL), not the world group's timeout: a frozen rank then hangs a sub-mesh collective for 30 minutes.
    ``dist.set_timeout`` changes a group's timeout for every later operation.
    """
    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    names = mesh.mesh_dim_names or tuple(range(mesh.ndim))
    seen = set()
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if id(group) in seen or group == dist.GroupMember.NON_GROUP_MEMBER:
            continue
        seen.add(id(group))
        dist.set_timeout(timeout, group)
        log.debug("mesh axis %s: timeout %s", names[dim], timeout)


def build_mesh_with_timeout(
    device_type: str, shape: Sequence[int], names: Sequence[str], *, timeout: timedelta | float
):
    """``init_device_mesh(device_type, shape, mesh_dim_names=names)`` whose every group has ``timeout``.

    Also sets it on the default group. Flattened or sliced meshes made later from this one create new
    groups: pass those through :func:`set_mesh_timeout` too.
    """
    from torch.distributed.device_mesh import init_device_mesh

    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout={timeout} must be positive, e.g. timeout=60 (seconds).")
    mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
    dist.set_timeout(timeout)
    set_mesh_timeout(mesh, timeout)
    return mesh


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
    except Exception as exc:  # noqa: BLE001 - the store may be gone with its host; still end quietly
        if heartbeat.rank == 0:
            print(f"[distnn] rank 0 failed ({error}); the run's store is unreachable ({exc}).", file=sys.stderr)
    finally:
        kill_processes(children)
        if exit:
            exit_quietly(exit_code)
        _handling.release()
    return report


def _tame_lightning_observer(grace: float) -> None:
    """Make Lightning's child-process observer wait ``grace`` s before it SIGKILLs the launching rank.

    Lightning's ``_ChildProcessObserver`` (started by ``_SubprocessScriptLauncher.launch``) kills rank 0
    within 5 s of a child's death, often before rank 0 could name the dead rank. Until the strategies
    launch with :class:`FaultAwareLauncher`, this delays it (it still kills everything in the end).
    """
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_terminate_all"):
            original = thread._terminate_all

            def delayed(original=original):
                time.sleep(grace)
                original()

            thread._terminate_all = delayed


from lightning.pytorch.callbacks import Callback  # noqa: E402 - Lightning glue below, pure functions above


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
            _tame_lightning_observer(self.grace + 3.0)
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
