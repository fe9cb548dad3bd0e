"""Multi-process test harness for gloo: a race-free rendezvous, one process per rank, bounded time.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, sets the
torch.distributed environment variables (``MASTER_ADDR/PORT``, ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``) so Lightning treats them as launched externally (like torchrun), calls
``fn(rank, world_size, *args)`` in each and returns the per-rank results in rank order.
A rank that raises, dies or outlives ``timeout`` ends the whole group and raises here with that
rank's traceback; nothing is left hanging. ``fn`` must be importable (a module-level function).

The ranks are forked from a ``forkserver`` that imported torch, Lightning and this package once, so a
rank starts in a fraction of a second instead of the ~8 s of CPU a fresh interpreter spends importing
them (on a 2-core machine that was most of the suite's time). A rank still starts clean: the server
forks before any test code runs, it gets the caller's current environment, and ``fn`` and its
arguments are pickled as under ``spawn``. ``start_method="spawn"`` (or ``DISTNN_TEST_START_METHOD=spawn``)
gives every rank a fresh interpreter instead.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that is free on localhost right now (it may be taken again before it is used:
    :func:`run_distributed` does not rely on it, see :func:`_rendezvous_store`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous_store():
    """A TCPStore server held by this (parent) process on a port the OS picked and keeps bound.

    The ranks connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE=True``, the way torchrun's agent
    hosts the store), so no port is picked, released and re-bound: two jobs can never race for it.
    """
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))


# imported once in the forkserver, before any test code runs; every rank is forked with them loaded
PRELOAD = ("torch", "torch.distributed", "lightning", "lightning_distnn", "lightning_distnn.models", "lightning_distnn.data")
START_METHODS = ("forkserver", "spawn")


def _context(method: Optional[str] = None):
    """The multiprocessing context of the ranks: ``forkserver`` with :data:`PRELOAD` imported in the server
    (where the platform has it; else ``spawn``), or ``spawn``."""
    method = method or os.environ.get("DISTNN_TEST_START_METHOD") or "forkserver"
    if method not in START_METHODS:
        raise ValueError(f"start method {method!r} is not one of {START_METHODS}: pass start_method='spawn' or "
                         "'forkserver' (or set DISTNN_TEST_START_METHOD to one of them).")
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


class DistributedTestError(RuntimeError):
    """A rank failed, died or timed out."""


def _entry(fn, rank, world_size, port, init_process_group, pg_timeout, env, results, args, kwargs):
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
            "TORCHELASTIC_USE_AGENT_STORE": "True",  # every rank is a client of the parent's store
        }
    )
    torch.set_num_threads(1)
    try:
        if init_process_group:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        out = fn(rank, world_size, *args, **kwargs)
        buffer = io.BytesIO()  # plain bytes: tensors in shared memory die with this process
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    init_process_group: bool = False,
    pg_timeout: float = 60.0,
    env: Optional[dict[str, str]] = None,
    start_method: Optional[str] = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes.

    Args:
        timeout: seconds for the whole group; past it every rank is killed and this raises.
        init_process_group: initialise the default gloo group before calling ``fn`` (leave False
            when ``fn`` builds a Lightning Trainer, which initialises it itself).
        pg_timeout: collective timeout of that group, in seconds.
        env: extra environment variables for the ranks (on top of this process's environment).
        start_method: ``"forkserver"`` (default, or ``DISTNN_TEST_START_METHOD``) or ``"spawn"``.
    """
    ctx = _context(start_method)
    env = {**os.environ, **(env or {})}  # a forked rank would otherwise see the server's environment
    results = ctx.Queue()
    store = _rendezvous_store()  # kept alive (and its port bound) until every rank is done
    port = store.port
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, init_process_group, pg_timeout, env, results, args, kwargs),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failure: Optional[str] = None
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size and failure is None:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    # give a reported traceback a moment to arrive before naming the dead rank
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} and reported nothing"
                        break
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    failure = f"ranks {missing} did not finish within {timeout:.0f} s (killed)"
                    break
                else:
                    continue
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failure = f"rank {rank} raised:\n{payload}"
    finally:
        for p in procs:
            p.join(timeout=5 if failure is None else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    if failure is not None:
        raise DistributedTestError(failure)
    return [outputs[r] for r in range(world_size)]


def assert_state_dicts_close(actual: dict, expected: dict, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Every tensor of ``expected`` is in ``actual`` and equal within ``atol`` (fp32 tolerance)."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise AssertionError(f"missing tensors: {missing}")
    worst = []
    for name, ref in expected.items():
        got = actual[name]
        if got.shape != ref.shape:
            raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        if diff > atol + rtol * ref.abs().max().item():
            worst.append(f"{name}: max |diff| = {diff:.3e}")
    if worst:
        raise AssertionError(f"{len(worst)} tensors differ by more than atol={atol}:\n" + "\n".join(worst))
