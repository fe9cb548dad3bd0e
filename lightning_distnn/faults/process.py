"""Processes on this host: their state, a quiet exit, dying with the launcher, SIGKILL for stopped ones."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Iterable

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
