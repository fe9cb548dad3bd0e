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
- Every group of the run's DeviceMesh gets the configured timeout in one place,
  :meth:`lightning_distnn.mesh.ParallelDims.build_mesh` (torch's ``init_device_mesh`` creates
  sub-mesh groups with ``new_group(..., timeout=None)``, i.e. torch's default of 30 minutes for gloo,
  not the world group's timeout).
"""

from lightning_distnn.faults.heartbeat import Beat, FaultReport, Heartbeat, RankState, diagnose, store_from_env
from lightning_distnn.faults.monitor import (
    FaultMonitor,
    RankFailedError,
    attach_fault_monitor,
    check_fault_monitor,
    handle_failure,
)
from lightning_distnn.faults.process import die_with_parent, exit_quietly, kill_processes, process_state

__all__ = [
    "Beat",
    "FaultMonitor",
    "FaultReport",
    "Heartbeat",
    "RankFailedError",
    "RankState",
    "attach_fault_monitor",
    "check_fault_monitor",
    "diagnose",
    "die_with_parent",
    "exit_quietly",
    "handle_failure",
    "kill_processes",
    "process_state",
    "store_from_env",
]
