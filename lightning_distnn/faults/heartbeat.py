"""Per-rank heartbeats and failure records in the run's c10d store, and the diagnosis that names the culprit."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

from lightning_distnn.faults.process import process_state

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

    def mark_exiting(self) -> None:
        """Stop beating and record that this rank is about to exit (the reporter waits for these marks, so
        the store's host, often rank 0, does not leave while others still talk to it)."""
        self._stop.set()
        with self._lock:
            self.store.set(f"exiting/{self.rank}", b"1")

    def mark_reported(self) -> None:
        """The reporter is done with the store (it printed the message and waited for the others)."""
        with self._lock:
            self.store.set("reported", b"1")

    def reported(self) -> bool:
        return self._get("reported") is not None

    def exited(self) -> set[int]:
        """Ranks that marked themselves exiting."""
        return {r for r in range(self.world_size) if self._get(f"exiting/{r}") is not None}

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
    ending: str = "Every process exits with code 1."

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
            return f"{head}{tail}. {self.ending}"
        if self.first_error_rank is not None:
            r = self.ranks[self.first_error_rank]
            return (
                f"{r.who()} failed at step {r.step}: {self.first_error}. The other ranks stopped with it. "
                f"{self.ending}"
            )
        return f"a collective failed but no rank is missing or reported an error. {self.ending}"


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
