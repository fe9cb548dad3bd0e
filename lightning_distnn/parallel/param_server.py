"""Parameter server on torch.distributed point-to-point operations (gloo or NCCL).

Master/worker synchronisation: *workers* compute gradients and push them; *servers* own shards
of the parameters, apply the optimizer to their shard, and send the new values back (the pull).

* ``mode="sync"``: a server waits for one push from every worker, averages, steps once and
  replies to all; this is exactly synchronous SGD (same weights as all-reduce / one process).
* ``mode="async"``: a server applies every push as it arrives (gradient / num_workers) and replies
  at once, unless that worker is more than ``max_staleness`` steps ahead of the slowest active
  worker; then the reply (with fresher parameters) waits until the slowest catches up.
* sharded: parameters are split over ``num_servers`` server ranks (whole tensors, greedy by size,
  see :func:`plan_shards`). Servers run co-located (a thread on ranks ``0..S-1``, which also train)
  or dedicated (ranks ``W-S..W-1`` only serve; see :func:`split_roles`).

Messages on a dedicated process group: worker -> server ``header=[kind, step]`` (tag 1) then the
codec's payload tensors (tags 2, 3, ...); server -> worker the shard's flat fp32 parameters (tag
64). Every receive names its source, so a peer that dies surfaces at once as an error naming its
rank (gloo reports "connection closed"); a silent peer surfaces after ``timeout``.

Usage (pure torch, inside an initialised process group)::

    plan = plan_shards(model.named_parameters(), servers=[0], workers=[0, 1])
    ps = ParameterServerGroup(model, plan, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    for batch in data:
        loss(model(batch)).backward()
        ps.push_pull()
    ps.close()
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_distnn.parallel.accounting import CommCounter, nbytes
from lightning_distnn.parallel.compression import Codec, CompressionConfig, make_codec

PS_MODES = ("sync", "async")
PUSH, STOP = 1, 2
TAG_HEADER, TAG_PAYLOAD, TAG_PARAMS = 1, 2, 64


class PeerFailure(RuntimeError):
    """A worker or server of the parameter server died or went silent."""


def split_roles(world_size: int, num_servers: int, colocated: bool) -> tuple[list[int], list[int]]:
    """``(servers, workers)`` ranks. Co-located: servers ``0..S-1`` and every rank works;
    dedicated: servers are the last ``S`` ranks and only the others work."""
    if not isinstance(num_servers, int) or num_servers < 1:
        raise ValueError(f"num_servers={num_servers!r} must be a positive integer (1 = one server holds everything).")
    if colocated:
        if num_servers > world_size:
            raise ValueError(
                f"num_servers={num_servers} co-located servers need at least {num_servers} processes, the run has "
                f"{world_size}: lower num_servers or raise Trainer(devices=...)."
            )
        return list(range(num_servers)), list(range(world_size))
    if num_servers >= world_size:
        raise ValueError(
            f"num_servers={num_servers} dedicated servers leave no worker among {world_size} processes: use "
            f"devices >= {num_servers + 1}, fewer servers, or colocated=True."
        )
    return list(range(world_size - num_servers, world_size)), list(range(world_size - num_servers))


@dataclass
class ShardPlan:
    """Which server rank owns each parameter (plain data; ``print(plan)`` shows a table)."""

    servers: list[int]
    workers: list[int]
    names: list[str]
    shapes: list[torch.Size]
    owner: list[int]

    def indices(self, server: int) -> list[int]:
        return [i for i, s in enumerate(self.owner) if s == server]

    def values(self, server: int) -> int:
        return sum(int(self.shapes[i].numel()) for i in self.indices(server))

    def __str__(self) -> str:
        lines = ["| server rank | tensors | values |", "|---|---|---|"]
        for s in self.servers:
            lines.append(f"| {s} | {len(self.indices(s))} | {self.values(s)} |")
        lines.append(f"workers: {self.workers}")
        return "\n".join(lines)


def plan_shards(named_parameters: Iterable[tuple[str, torch.Tensor]], *, servers: Sequence[int], workers: Sequence[int]) -> ShardPlan:
    """Assign whole tensors to servers, largest first to the least-loaded server."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters: nothing for a parameter server to hold.")
    load = {s: 0 for s in servers}
    owner = [0] * len(named)
    for i in sorted(range(len(named)), key=lambda i: -named[i][1].numel()):
        s = min(servers, key=lambda s: (load[s], s))
        owner[i] = s
        load[s] += named[i][1].numel()
    return ShardPlan(list(servers), list(workers), [n for n, _ in named], [p.shape for _, p in named], owner)


class ParameterServer:
    """One server: owns a shard, applies the optimizer, answers pushes (``run`` blocks until every
    worker sent STOP). Co-located servers run ``run`` in a thread; the local worker talks to it
    through in-process queues (gloo cannot send to its own rank)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        rank: int,
        workers: Sequence[int],
        group: dist.ProcessGroup,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        codec_factory: Callable[[], Codec],
        mode: str = "sync",
        max_staleness: int = 0,
        counter: Optional[CommCounter] = None,
        timeout: float = 300.0,
    ) -> None:
        self.params = [nn.Parameter(p.detach().clone().float()) for p in params]
        self.shapes = [p.shape for p in self.params]
        self.optimizer = optimizer_factory(self.params)
        self.rank, self.workers, self.group = rank, list(workers), group
        self.mode, self.max_staleness = mode, max_staleness
        self.decoder = codec_factory()
        self.specs = self.decoder.specs(self.shapes)
        self.counter = counter or CommCounter()
        self.timeout = timeout
        self.inbox: queue.Queue = queue.Queue()  # (worker, kind, step, payload) or ("error", exc)
        self.local_replies: queue.Queue = queue.Queue()  # flat params for the co-located worker
        self.error: Optional[BaseException] = None
        self.updates = 0
        self.max_lead = 0  # largest (worker steps - slowest worker's steps) a reply was sent at
        self._sends: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self._receivers: list[threading.Thread] = []

    # -- receiving ---------------------------------------------------------------------------
    def _receive_from(self, worker: int) -> None:
        header = torch.zeros(2, dtype=torch.int64)
        try:
            while True:
                dist.recv(header, src=worker, group=self.group, tag=TAG_HEADER)
                kind, step = int(header[0]), int(header[1])
                payload = []
                if kind == PUSH:
                    for i, (shape, dtype) in enumerate(self.specs):
                        buf = torch.empty(shape, dtype=dtype)
                        dist.recv(buf, src=worker, group=self.group, tag=TAG_PAYLOAD + i)
                        payload.append(buf)
                self.counter.add(received=nbytes(header) + sum(nbytes(t) for t in payload))
                self.inbox.put((worker, kind, step, payload))
                if kind == STOP:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the serving loop
            self.inbox.put(("error", PeerFailure(
                f"parameter server rank {self.rank}: worker rank {worker} died or stopped answering "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Check that rank's log; the job ends here."
            )))

    def deliver(self, worker: int, kind: int, step: int, payload: list[torch.Tensor]) -> None:
        """The co-located worker's push (no bytes on the wire)."""
        self.inbox.put((worker, kind, step, payload))

    # -- replying ----------------------------------------------------------------------------
    def _reply(self, worker: int) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        if worker == self.rank:
            self.local_replies.put(flat)
            return
        previous = self._sends.pop(worker, None)
        if previous is not None:
            previous[0].wait()
        self._sends[worker] = (dist.isend(flat, dst=worker, group=self.group, tag=TAG_PARAMS), flat)
        self.counter.add(sent=nbytes(flat))

    def _apply(self, grads: list[torch.Tensor], scale: float) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.detach().float().mul(scale).view(p.shape).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    # -- serving -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.local_replies.put(exc)
            raise

    def _serve(self) -> None:
        for w in self.workers:
            if w != self.rank:
                t = threading.Thread(target=self._receive_from, args=(w,), daemon=True, name=f"ps{self.rank}-recv{w}")
                t.start()
                self._receivers.append(t)
        active = set(self.workers)
        clock = {w: 0 for w in self.workers}
        pending_sum: Optional[list[torch.Tensor]] = None
        pushed: set[int] = set()
        held: set[int] = set()
        n = len(self.workers)
        while active:
            try:
                item = self.inbox.get(timeout=self.timeout)
            except queue.Empty:
                raise PeerFailure(
                    f"parameter server rank {self.rank}: no message from workers {sorted(active)} within "
                    f"{self.timeout:.0f} s; a worker hangs or died. Raise `timeout` if steps are really that slow."
                ) from None
            if item[0] == "error":
                raise item[1]
            worker, kind, step, payload = item
            if kind == STOP:
                active.discard(worker)
                held.discard(worker)
            else:
                grads = self.decoder.decode(payload, self.shapes)
                clock[worker] += 1
                if self.mode == "async":
                    self._apply(grads, 1.0 / n)
                    held.add(worker)
                else:
                    if pending_sum is None:
                        pending_sum = [g.detach().float().clone() for g in grads]
                    else:
                        for acc, g in zip(pending_sum, grads):
                            acc.add_(g.float())
                    pushed.add(worker)
            if self.mode == "sync" and active and pushed >= active:
                if pending_sum is not None:
                    self._apply(pending_sum, 1.0 / len(pushed))
                pending_sum = None
                for w in sorted(pushed & active):
                    self._reply(w)
                pushed = set()
            if self.mode == "async" and held:
                slowest = min((clock[w] for w in active), default=0)
                for w in sorted(held):
                    if clock[w] - slowest <= self.max_staleness:
                        self.max_lead = max(self.max_lead, clock[w] - slowest)
                        held.discard(w)
                        self._reply(w)
        for work, _ in self._sends.values():
            work.wait()
        self._sends.clear()


class ParameterServerGroup:
    """This rank's side of the parameter server: its worker client and, if it hosts one, its server.

    Args:
        module: the model; its trainable parameters, in ``named_parameters`` order, are the plan's.
        plan: from :func:`plan_shards`.
        optimizer_factory: builds the server's optimizer over its shard (e.g. the user's optimizer
            class with its hyper-parameters).
        compression: codec for pushes (:class:`CompressionConfig`); pulls are fp32.
        mode, max_staleness: see the module docstring.
        group: process group for the traffic (default: a new group over all ranks).
        colocated: run this rank's server in a thread (else :meth:`serve` blocks the caller).
        timeout: seconds to wait for any peer before raising :class:`PeerFailure`.
    """

    def __init__(
        self,
        module: nn.Module,
        plan: ShardPlan,
        *,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        compression: Optional[CompressionConfig] = None,
        mode: str = "sync",
        max_staleness: int = 0,
        group: Optional[dist.ProcessGroup] = None,
        colocated: bool = True,
        counter: Optional[CommCounter] = None,
        timeout: float = 300.0,
    ) -> None:
        if mode not in PS_MODES:
            raise ValueError(f"Unknown parameter-server mode={mode!r}; valid: {', '.join(PS_MODES)}.")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness!r} must be an integer >= 0 (0 = lock-step).")
        self.rank = dist.get_rank()
        self.plan, self.mode, self.timeout = plan, mode, timeout
        self.group = group if group is not None else dist.new_group(backend=dist.get_backend(), timeout=timedelta(seconds=timeout))
        self.params = [p for p in module.parameters() if p.requires_grad]
        if len(self.params) != len(plan.shapes):
            raise ValueError(f"The plan has {len(plan.shapes)} tensors, the module {len(self.params)}: build the plan from this module.")
        self.counter = counter or CommCounter()
        compression = compression or CompressionConfig()
        self.codecs = {s: make_codec(compression) for s in plan.servers}
        self.is_worker = self.rank in plan.workers
        self.server: Optional[ParameterServer] = None
        self._thread: Optional[threading.Thread] = None
        self.step = 0
        self.closed = False
        if self.rank in plan.servers:
            self.server = ParameterServer(
                [self.params[i] for i in plan.indices(self.rank)],
                rank=self.rank,
                workers=plan.workers,
                group=self.group,
                optimizer_factory=optimizer_factory,
                codec_factory=lambda: make_codec(compression),
                mode=mode,
                max_staleness=max_staleness,
                counter=self.counter,
                timeout=timeout,
            )
            if colocated:
                self._thread = threading.Thread(target=self._run_server, daemon=True, name=f"ps-server{self.rank}")
                self._thread.start()

    def _run_server(self) -> None:
        try:
            self.server.run()
        except BaseException:  # noqa: BLE001 - kept in server.error, raised in the worker
            pass

    def _check_server(self) -> None:
        if self.server is not None and self.server.error is not None:
            raise self.server.error

    def push_pull(self) -> None:
        """Push this worker's gradients to every server, wait for and load the new parameters."""
        self._check_server()
        self.step += 1
        sends = []
        for s in self.plan.servers:
            grads = [self.params[i].grad if self.params[i].grad is not None else torch.zeros_like(self.params[i]) for i in self.plan.indices(s)]
            payload = self.codecs[s].encode([g.detach() for g in grads])
            if s == self.rank:
                self.server.deliver(self.rank, PUSH, self.step, payload)
                continue
            header = torch.tensor([PUSH, self.step], dtype=torch.int64)
            sends.append(dist.isend(header, dst=s, group=self.group, tag=TAG_HEADER))
            for i, t in enumerate(payload):
                sends.append(dist.isend(t.contiguous(), dst=s, group=self.group, tag=TAG_PAYLOAD + i))
            self.counter.add(sent=nbytes(header) + sum(nbytes(t) for t in payload))
        for s in self.plan.servers:
            flat = self._pull(s)
            with torch.no_grad():
                offset = 0
                for i in self.plan.indices(s):
                    p = self.params[i]
                    p.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
        for work in sends:
            self._wait(work, "send to", None)

    def wait_for_updates(self, count: int) -> None:
        """Block until this rank's server has applied ``count`` updates (a dedicated server rank, sync mode).

        A dedicated server rank's main thread walks Lightning's loop without computing; waiting here keeps
        it at the step its server is applying, so the hyper-parameters it reads for that update (an LR
        scheduler steps this rank's optimizer too) are those of the same step, as on the workers.
        """
        if self.server is None:
            return
        deadline = time.monotonic() + self.timeout
        while self.server.updates < count:
            self._check_server()
            if self.closed or time.monotonic() > deadline:
                raise PeerFailure(
                    f"parameter server rank {self.rank}: update {count} not applied within {self.timeout:.0f} s; "
                    "a worker hangs or died (see the other ranks' errors)."
                )
            time.sleep(0.0005)

    def _pull(self, server: int) -> torch.Tensor:
        if server == self.rank:
            try:
                item = self.server.local_replies.get(timeout=self.timeout)
            except queue.Empty:
                raise PeerFailure(
                    f"worker rank {self.rank}: its co-located server gave no parameters within {self.timeout:.0f} s; "
                    "another worker is probably stuck or dead (see the other ranks' errors)."
                ) from None
            if isinstance(item, BaseException):
                raise item
            return item
        flat = torch.empty(self.plan.values(server))
        self._wait(dist.irecv(flat, src=server, group=self.group, tag=TAG_PARAMS), "receive from", server)
        self.counter.add(received=nbytes(flat))
        return flat

    def _wait(self, work, what: str, peer: Optional[int]) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            self._check_server()
            who = f"server rank {peer}" if peer is not None else "a server"
            raise PeerFailure(
                f"worker rank {self.rank}: could not {what} {who} ({str(exc).splitlines()[0][:200]}). That rank died "
                "or timed out; check its log. The job ends here instead of hanging."
            ) from exc

    # -- checkpoints: the servers' optimizer state lives in the servers, not in the workers' optimizer --
    def export_state(self, optimizer: torch.optim.Optimizer, *, group: Optional[dist.ProcessGroup] = None) -> None:
        """Copy every server's optimizer state (e.g. SGD momentum, Adam moments) into ``optimizer``,
        the workers' optimizer over the module's parameters, so that saving ``optimizer`` saves it.

        The workers' optimizer never steps under a parameter server (the servers do), so its state is
        empty until this runs. A collective over ``group`` (default: all ranks): every rank calls it,
        between steps (sync mode: after :meth:`push_pull` returned; any mode: after :meth:`close`).
        """
        local: dict[int, dict] = {}
        if self.server is not None:
            for j, i in enumerate(self.plan.indices(self.rank)):
                state = self.server.optimizer.state.get(self.server.params[j])
                if state:
                    local[i] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        for part in parts:
            for i, state in part.items():
                p = self.params[i]
                optimizer.state[p] = {
                    k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in state.items()
                }

    def import_state(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Seed this rank's server from the module's current parameters and ``optimizer``'s state.

        Call it after a checkpoint was restored into the module and the workers' optimizer (as written
        by :meth:`export_state`) and before the first :meth:`push_pull`: the server copied the
        parameters when it was built, before the restore, and would otherwise serve those. Local (no
        communication); a rank without a server does nothing.
        """
        if self.server is None:
            return
        if self.step:
            raise RuntimeError(
                f"import_state() after {self.step} push_pull() calls: call it once, before the first step."
            )
        with torch.no_grad():
            for j, i in enumerate(self.plan.indices(self.rank)):
                served, source = self.server.params[j], self.params[i]
                served.copy_(source.detach().to(served.device, served.dtype))
                state = optimizer.state.get(source) if optimizer is not None else None
                if state:
                    self.server.optimizer.state[served] = {
                        k: (v.detach().clone().to(served.device) if isinstance(v, torch.Tensor) and v.dim() > 0
                            else v.detach().clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in state.items()
                    }
                else:
                    self.server.optimizer.state.pop(served, None)

    def close(self) -> None:
        """Tell every server this worker is done; join the co-located server."""
        if self.closed:
            return
        self.closed = True
        if self.is_worker:
            for s in self.plan.servers:
                if s == self.rank:
                    self.server.deliver(self.rank, STOP, self.step, [])
                else:
                    header = torch.tensor([STOP, self.step], dtype=torch.int64)
                    self.counter.add(sent=nbytes(header))
                    self._wait(dist.isend(header, dst=s, group=self.group, tag=TAG_HEADER), "send to", s)
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
            self._check_server()
