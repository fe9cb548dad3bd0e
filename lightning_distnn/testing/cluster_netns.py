"""The machine side of the simulated cluster: network namespaces, ``tc`` shaping, leftovers.

Small stdlib-only functions around iproute2 (``ip``, ``tc``) used by
:mod:`lightning_distnn.testing.cluster`: link speeds, the support check (root, iproute2, a probe
namespace), deleting namespaces with whatever runs inside them, and removing the namespaces of
dead runs. Nothing here touches the host's own network namespace.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence, Union


PREFIX = "distnn"
_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "k": 10**3, "m": 10**6, "g": 10**9}
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-(br|n\d+)$")



class ClusterError(RuntimeError):
    """The simulated cluster could not be built, or a node's command failed."""


# ---- link speeds ------------------------------------------------------------------------------
def parse_link(link: Union[None, str, int, float]) -> Optional[int]:
    """A link speed in bit/s: ``"100mbit"``, ``"1gbit"``, ``"500kbit"``, a number of bit/s, or
    ``None``/``"unlimited"`` (no shaping, returns None)."""
    if link is None or (isinstance(link, str) and link.strip().lower() in ("", "unlimited", "none", "inf")):
        return None
    if isinstance(link, (int, float)) and not isinstance(link, bool):
        rate = float(link)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(link).lower())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(
                f"link={link!r} is not a speed: write e.g. '20mbit', '100mbit', '1gbit', '500kbit' or 'unlimited'."
            )
        rate = float(match.group(1)) * _UNITS[match.group(2)]
    if rate < 8000:
        raise ValueError(f"link={link!r} is {rate:g} bit/s; the slowest link tc shapes well here is 8kbit. Raise it.")
    return int(rate)


def format_rate(rate: Optional[int]) -> str:
    if rate is None:
        return "unlimited"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if rate >= scale:
            return f"{rate / scale:.4g}{unit}"
    return f"{rate}bit"


def tbf_args(rate: int) -> list[str]:
    """``tc`` arguments of a token bucket at ``rate`` bit/s with a 100 ms queue and a burst of 1 ms of
    traffic (at least 16 KiB), so the link behaves like a wire of that speed.

    A larger bucket lets a message that follows a pause leave at the veth's own speed: with 10 ms
    (125 KiB at 100 Mbit/s) a 256 KiB pipeline activation crossed in 13 ms instead of 21, and the
    planner's latency + bytes / bandwidth model, fitted on back-to-back transfers, was 21-38% slow.
    With 1 ms a message after a pause takes what it takes back to back, and 1 ms is enough for the
    shaper to keep up at 1 Gbit/s here (16 KiB reaches only half of it). ``tbf`` splits a GSO packet
    larger than the bucket into segments, so the bucket need not hold 64 KiB.
    """
    burst = max(rate // 8 // 1000, 16 * 1024)
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "100ms"]



# ---- the machine: namespaces, support check, leftovers ----------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (empty if ``ip`` is missing)."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


_SUPPORT: dict[str, Optional[str]] = {}


def unsupported_reason() -> Optional[str]:
    """None when this machine can host a simulated cluster, else one line saying why not."""
    if "reason" in _SUPPORT:
        return _SUPPORT["reason"]
    reason: Optional[str] = None
    if sys.platform != "linux":
        reason = f"the simulated cluster needs Linux network namespaces; this is {sys.platform}"
    elif os.geteuid() != 0:
        reason = "the simulated cluster needs root (network namespaces, tc); run as root or skip it"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "the simulated cluster needs iproute2 (`ip` and `tc`); install iproute2"
    else:
        probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-br"  # a dead run's name if we die here
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            reason = f"cannot create a network namespace (`ip netns add` said: {made.stderr.strip()})"
        else:
            shaped = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", *tbf_args(10**8)],
                                    capture_output=True, text=True)
            if shaped.returncode != 0:
                reason = f"tc cannot shape a link here (`tc qdisc add ... tbf` said: {shaped.stderr.strip()})"
            _ip("netns", "del", probe, check=False)
    _SUPPORT["reason"] = reason
    return reason


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process inside ``namespace`` (only processes we started live there)."""
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill the processes inside and delete ``names``; returns those that could not be deleted."""
    left = []
    for name in names:
        _kill_namespace_processes(name)
        if _ip("netns", "del", name, check=False).returncode != 0 and name in list_namespaces():
            left.append(name)
    return left


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces of earlier runs whose creating process is gone; returns their names."""
    stale = []
    for name in list_namespaces():
        match = _NAME_RE.match(name) if prefix == PREFIX else re.match(rf"^{re.escape(prefix)}-(\d+)-", name)
        if match and not _pid_alive(int(match.group(1))):
            stale.append(name)
    delete_namespaces(stale)
    return stale


# ---- link measurement (run inside two nodes; stdlib only) -----------------------------------
_RECEIVER = """
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, port)); s.listen(1)
s.settimeout(30); c, _ = s.accept(); c.settimeout(60)
got, first = 0, None
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    if first is None:
        first = time.perf_counter()
    got += len(b)
print(got, time.perf_counter() - first)
"""

_SENDER = """
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(50):
    try:
        s = socket.create_connection((addr, port), timeout=5); break
    except OSError:
        time.sleep(0.1)
chunk = b"x" * (1 << 16)
sent = 0
while sent < n:
    sent += s.send(chunk[: min(len(chunk), n - sent)])
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
"""


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after 5 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
