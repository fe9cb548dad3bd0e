"""A cluster in a box: N simulated nodes on one Linux machine, joined by links of a chosen speed.

Each node is a network namespace with one interface (``eth0``) and its own address in a private
subnet that exists only inside the namespaces of this run. The nodes' cables end on a bridge that
lives in a namespace of its own; the machine's own network configuration is never touched. Each
cable is shaped with ``tc tbf`` in both directions (rate only: this kernel has no ``netem``, so no
added delay). Every node runs ``torchrun --nnodes N --node-rank k`` inside its namespace with gloo
bound to ``eth0``, exactly as on a real cluster of N machines::

    distnn-cluster --nodes 2 --procs-per-node 1 --link 100mbit -- distnn-train trainer.num_nodes=2
    distnn-cluster --nodes 2 --link 20mbit --measure          # what the link carries, then exit
    distnn-cluster --cleanup                                  # remove namespaces of dead runs

From Python (tests, benchmarks)::

    with SimulatedCluster(nodes=2, link="100mbit") as cluster:
        results = cluster.run(["python", "-m", "lightning_distnn.testing.cluster_job", "--out", d, "dp"])
        cluster.set_link("20mbit")                            # reshape in place, namespaces stay

Namespaces are named ``distnn-<pid>-<hex>-{br,n0,n1,...}``; they are removed on exit, on errors and
on SIGINT/SIGTERM/SIGHUP, and :func:`cleanup_stale` removes those whose creating process is dead.
It needs root and iproute2 (``ip``, ``tc``); :func:`unsupported_reason` says in one line why not.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from lightning_distnn.testing.cluster_netns import (  # noqa: F401  (re-exported: the public API lives here)
    PREFIX,
    ClusterError,
    _RECEIVER,
    _SENDER,
    _ip,
    _kill_namespace_processes,
    _terminate,
    cleanup_stale,
    delete_namespaces,
    format_rate,
    list_namespaces,
    parse_link,
    tbf_args,
    unsupported_reason,
)

NODE_IFNAME = "eth0"
BRIDGE = "br0"
DEFAULT_SUBNET = "10.77.0.0/24"

Command = Union[Sequence[str], Callable[[int], Sequence[str]]]


# ---- plain data: the plan ---------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    """One simulated machine: its namespace, interface, address and its port on the bridge."""

    rank: int
    namespace: str
    address: str
    interface: str = NODE_IFNAME
    bridge_port: str = ""


@dataclass(frozen=True)
class ClusterPlan:
    """Names and addresses of one run; prints as a table."""

    run_id: str
    bridge_namespace: str
    subnet: str
    nodes: tuple[NodeSpec, ...]
    link: Optional[int] = None

    @property
    def master_addr(self) -> str:
        return self.nodes[0].address

    @property
    def namespaces(self) -> list[str]:
        return [n.namespace for n in self.nodes] + [self.bridge_namespace]

    def __str__(self) -> str:
        lines = [f"simulated cluster {self.run_id}: {len(self.nodes)} nodes, link {format_rate(self.link)} each, "
                 f"subnet {self.subnet}, bridge {BRIDGE} in {self.bridge_namespace}",
                 "| node | namespace | interface | address | bridge port |", "|---|---|---|---|---|"]
        lines += [f"| {n.rank} | {n.namespace} | {n.interface} | {n.address} | {n.bridge_port} |" for n in self.nodes]
        return "\n".join(lines)


def plan_cluster(*, nodes: int, link: Union[None, str, int] = None, subnet: str = DEFAULT_SUBNET,
                 run_id: Optional[str] = None) -> ClusterPlan:
    """Names and addresses for ``nodes`` namespaces (pure: creates nothing)."""
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"nodes={nodes!r} must be a positive integer (e.g. --nodes 2).")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as err:
        raise ValueError(f"subnet={subnet!r} is not a network ({err}); use e.g. {DEFAULT_SUBNET}.") from None
    if not net.is_private or net.version != 4:
        raise ValueError(f"subnet={subnet!r} must be a private IPv4 range (10/8, 172.16/12, 192.168/16), e.g. {DEFAULT_SUBNET}.")
    hosts = list(net.hosts())
    if nodes > len(hosts):
        raise ValueError(f"subnet={subnet} has {len(hosts)} addresses, {nodes} nodes need more: use a /24 or larger.")
    run_id = run_id or f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
    specs = tuple(
        NodeSpec(rank=k, namespace=f"{run_id}-n{k}", address=str(hosts[k]), bridge_port=f"p{k}") for k in range(nodes)
    )
    return ClusterPlan(run_id=run_id, bridge_namespace=f"{run_id}-br", subnet=str(net), nodes=specs,
                       link=parse_link(link))


# ---- results ------------------------------------------------------------------------------------
@dataclass
class NodeResult:
    """What one node's command did."""

    rank: int
    returncode: Optional[int]
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class _Running:
    rank: int
    proc: subprocess.Popen
    log: Path
    start: float
    pump: Optional[threading.Thread] = None
    lines: list[str] = field(default_factory=list)


class SimulatedCluster:
    """N network-namespace nodes joined through a bridge, links shaped with ``tc``; a context manager.

    Args:
        nodes: number of simulated machines.
        link: speed of every node's link (``"100mbit"``, ``"1gbit"``, ``None``/``"unlimited"``).
        procs_per_node: torchrun ``--nproc-per-node`` (overridable per :meth:`run`).
        subnet: private IPv4 range used inside the namespaces only.
        master_port: rendezvous port on node 0's address.
    """

    def __init__(self, *, nodes: int = 2, link: Union[None, str, int] = None, procs_per_node: int = 1,
                 subnet: str = DEFAULT_SUBNET, master_port: int = 29500) -> None:
        if not isinstance(procs_per_node, int) or procs_per_node < 1:
            raise ValueError(f"procs_per_node={procs_per_node!r} must be a positive integer (torchrun --nproc-per-node).")
        if not 1024 <= int(master_port) < 65536:
            raise ValueError(f"master_port={master_port!r} must be in 1024..65535.")
        self.plan = plan_cluster(nodes=nodes, link=link, subnet=subnet)
        self.procs_per_node = procs_per_node
        self.master_port = int(master_port)
        self._created: list[str] = []
        self._running: list[_Running] = []
        self._old_handlers: dict[int, object] = {}
        self._runs = 0
        self.started = False

    # -- lifecycle --
    def __enter__(self) -> "SimulatedCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "SimulatedCluster":
        """Create the namespaces, bridge, cables and shaping; raises :class:`ClusterError` (after
        removing whatever was made) when that fails."""
        reason = unsupported_reason()
        if reason:
            raise ClusterError(reason)
        cleanup_stale()
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.started = True
        return self

    def _build(self) -> None:
        plan, br = self.plan, self.plan.bridge_namespace
        prefix_len = ipaddress.ip_network(plan.subnet).prefixlen
        for ns in [br] + [n.namespace for n in plan.nodes]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", br, "link", "set", BRIDGE, "up")
        for node in plan.nodes:
            # the veth pair is born inside the bridge namespace; one end moves to the node's
            _ip("-n", br, "link", "add", node.bridge_port, "type", "veth", "peer", "name", node.interface,
                "netns", node.namespace)
            _ip("-n", br, "link", "set", node.bridge_port, "master", BRIDGE)
            _ip("-n", br, "link", "set", node.bridge_port, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/{prefix_len}", "dev", node.interface)
            _ip("-n", node.namespace, "link", "set", node.interface, "up")
        self.set_link(plan.link)

    def set_link(self, link: Union[None, str, int]) -> None:
        """Shape every node's link to ``link`` in both directions (in place; ``None`` = unlimited)."""
        rate = parse_link(link)
        for node in self.plan.nodes:
            for ns, dev in ((node.namespace, node.interface), (self.plan.bridge_namespace, node.bridge_port)):
                if rate is None:
                    subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                    continue
                cmd = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise ClusterError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        self.plan = ClusterPlan(self.plan.run_id, self.plan.bridge_namespace, self.plan.subnet, self.plan.nodes, rate)

    def close(self) -> None:
        """Stop every process of this cluster and delete its namespaces (idempotent; a second
        Ctrl-C or SIGTERM while this runs waits until it is done)."""
        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for running in self._running:
                _terminate(running.proc)
            self._running.clear()
            left = delete_namespaces(list(reversed(self._created)))
            self._created = [ns for ns in self._created if ns in left]
        finally:
            for sig, old in held.items():
                signal.signal(sig, old)
            self._restore_signal_handlers()
        self.started = False
        if left:
            raise ClusterError(f"could not delete namespaces {left}; remove them with `ip netns del NAME`.")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):  # turn the signal into an exception so every finally runs
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # -- running things on nodes --
    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        return self.plan.nodes

    def popen(self, rank: int, argv: Sequence[str], *, env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``rank``'s namespace (its own session, so it can be stopped as a group)."""
        if not self.started:
            raise ClusterError("the cluster is not started: use `with SimulatedCluster(...) as cluster:` or .start().")
        node = self.plan.nodes[rank]
        full_env = dict(os.environ if env is None else env)
        full_env.update(GLOO_SOCKET_IFNAME=node.interface, TP_SOCKET_IFNAME=node.interface,
                        DISTNN_NODE_ADDR=node.address)
        return subprocess.Popen(["ip", "netns", "exec", node.namespace, *argv], env=full_env,
                                start_new_session=True, **kwargs)

    def torchrun_argv(self, rank: int, command: Sequence[str], *, procs_per_node: Optional[int] = None,
                      master_port: Optional[int] = None) -> list[str]:
        """The torchrun line node ``rank`` runs: a ``.py`` script is run by torchrun's python, any other
        command (``python -m pkg.mod args``, ``distnn-train args``) as it is (``--no-python``)."""
        command = list(command)
        if not command:
            raise ValueError("command is empty: give what every node runs, e.g. ['distnn-train', 'trainer.num_nodes=2'].")
        base = [
            sys.executable, "-m", "torch.distributed.run",  # torchrun of this interpreter
            f"--nnodes={len(self.plan.nodes)}", f"--node-rank={rank}",
            f"--nproc-per-node={procs_per_node or self.procs_per_node}",
            f"--master-addr={self.plan.master_addr}", f"--master-port={master_port or self.master_port}",
        ]
        if command[0].endswith(".py"):
            return base + command
        return base + ["--no-python"] + command

    def run(self, command: Command, *, procs_per_node: Optional[int] = None, env: Optional[dict] = None,
            timeout: float = 600.0, cwd: Optional[str] = None, check: bool = True, stream: bool = False) -> list[NodeResult]:
        """Run ``command`` under torchrun on every node at once and wait for all.

        ``command`` is the same list on every node, or a function of the node rank. A node that fails
        stops the others; past ``timeout`` seconds all are stopped. With ``check`` a failure raises
        :class:`ClusterError` with the end of each node's output. ``stream`` copies output live,
        each line prefixed with its node.
        """
        self._runs += 1
        port = self.master_port + (self._runs - 1) % 100  # a fresh port per run: no TIME_WAIT clash
        logdir = Path(tempfile.mkdtemp(prefix=f"{self.plan.run_id}-logs-"))
        for rank in range(len(self.plan.nodes)):
            argv = command(rank) if callable(command) else command
            argv = self.torchrun_argv(rank, argv, procs_per_node=procs_per_node, master_port=port)
            log = logdir / f"node{rank}.log"
            if stream:
                proc = self.popen(rank, argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                running = _Running(rank, proc, log, time.monotonic())
                running.pump = threading.Thread(target=_pump, args=(running,), daemon=True)
                running.pump.start()
            else:
                with open(log, "w") as fh:
                    proc = self.popen(rank, argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
                running = _Running(rank, proc, log, time.monotonic())
            self._running.append(running)
        results = self._wait(timeout)
        shutil.rmtree(logdir, ignore_errors=True)
        if check and not all(r.ok for r in results):
            raise ClusterError(_failure_text(results, command))
        return results

    def _wait(self, timeout: float) -> list[NodeResult]:
        deadline = time.monotonic() + timeout
        ended: dict[int, float] = {}
        failed, timed_out = False, False
        try:
            while len(ended) < len(self._running):
                for r in self._running:
                    if r.rank not in ended and r.proc.poll() is not None:
                        ended[r.rank] = time.monotonic() - r.start
                        failed = failed or r.proc.returncode != 0
                if failed or time.monotonic() > deadline:
                    timed_out = not failed
                    break
                time.sleep(0.1)
        finally:
            for r in self._running:
                if r.proc.poll() is None:
                    _terminate(r.proc)
                    _kill_namespace_processes(self.plan.nodes[r.rank].namespace)
            results = []
            for r in self._running:
                if r.pump is not None:
                    r.pump.join(timeout=5)
                    output = "".join(r.lines)
                else:
                    output = r.log.read_text(errors="replace") if r.log.exists() else ""
                code = r.proc.returncode
                if timed_out and r.rank not in ended:
                    output += f"\n[distnn-cluster] node {r.rank} stopped after the {timeout:.0f} s timeout\n"
                elif r.rank not in ended:
                    output += "\n[distnn-cluster] node stopped because another node failed\n"
                results.append(NodeResult(r.rank, code, output, ended.get(r.rank, time.monotonic() - r.start)))
            self._running.clear()
        return results

    def traffic(self) -> list[dict[str, int]]:
        """Bytes and packets each node's ``eth0`` has sent and received so far (kernel counters):
        what really crossed the links."""
        out = []
        for node in self.plan.nodes:
            text = _ip("-n", node.namespace, "-j", "-s", "link", "show", node.interface).stdout
            stats = json.loads(text)[0]["stats64"]
            out.append({"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                        "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]})
        return out

    def measure_link(self, src: int = 0, dst: int = 1, *, seconds: float = 2.0, port: int = 5201) -> float:
        """Bit/s of one TCP stream from node ``src`` to node ``dst`` (receiver's clock, first to last byte)."""
        nbytes = int((self.plan.link or 10**9) / 8 * seconds)
        server = self.popen(dst, [sys.executable, "-c", _RECEIVER, self.plan.nodes[dst].address, str(port), str(nbytes)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        client = self.popen(src, [sys.executable, "-c", _SENDER, self.plan.nodes[dst].address, str(port), str(nbytes)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = server.communicate(timeout=60 + 4 * seconds)
            client.communicate(timeout=10)
        finally:
            _terminate(server)
            _terminate(client)
        if server.returncode != 0:
            raise ClusterError(f"link measurement failed: {err.strip()}")
        received, elapsed = out.split()
        return int(received) * 8 / float(elapsed)


def _pump(running: _Running) -> None:
    assert running.proc.stdout is not None
    for line in running.proc.stdout:
        running.lines.append(line)
        sys.stdout.write(f"[node {running.rank}] {line}")
        sys.stdout.flush()


def _failure_text(results: list[NodeResult], command: Command) -> str:
    shown = command(0) if callable(command) else command
    parts = [f"the simulated cluster's command failed: {shlex.join(list(shown))}"]
    for r in results:
        lines = r.output.strip().splitlines()
        # the workers' own errors come before torchrun's summary, which fills the tail
        errors = [l for l in lines[:-25] if re.search(r"(Error|Exception|what\(\)|terminate called)", l)
                  and "socket.cpp" not in l][-8:]
        text = "\n".join((["(errors above the tail:)"] + errors + ["..."] if errors else []) + lines[-25:])
        parts.append(f"--- node {r.rank}: exit code {r.returncode} after {r.seconds:.1f} s ---\n{text}")
    return "\n".join(parts)
