"""Count the bytes a process really hands to torch.distributed, to check the package's analytic counts.

:class:`WireCounter` is a context manager for one process of a test. While it is active:

* every call of torch.distributed's Python collectives and point-to-point functions (``send``,
  ``recv``, ``isend``, ``irecv``, ``batch_isend_irecv``, ``all_reduce``, ``all_gather``,
  ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``broadcast``, ``all_to_all_single``, the
  ``*_object`` helpers, ...) is recorded with the tensor bytes this rank hands over, from any thread
  (the parameter server's receivers and server threads too). A call made from inside another
  counted call (``all_gather_object`` uses ``all_gather``) is recorded once, as the outer call.
* with ``functional=True``, a dispatch mode records the functional collectives that DTensor and
  ``torch.distributed._functional_collectives`` issue (``_c10d_functional.all_reduce``,
  ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``, ...) in this thread.

What it cannot see: collectives that C++ issues directly, i.e. DDP's built-in reducer when no Python
communication hook is registered. The records are plain data (:class:`Call`); :meth:`WireCounter.bytes`
sums them by operation. Bytes are the payload a rank contributes (its input tensor), not the link
traffic of an algorithm (a ring all-reduce of N bytes moves 2 (W-1)/W N per rank).

Usage::

    with WireCounter(functional=True) as wire:
        trainer.fit(module, datamodule=data)
    wire.bytes(ops=("isend",))         # point-to-point bytes sent
    wire.calls(ops=("all_reduce",))    # the records themselves
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# name -> how to find the tensor(s) whose bytes this rank hands over
_TENSOR_ARG = {
    "send": 0, "recv": 0, "isend": 0, "irecv": 0,
    "all_reduce": 0, "broadcast": 0, "reduce": 0,
    "all_gather": 1,  # (tensor_list, tensor): what this rank contributes is `tensor`
    "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "all_to_all_single": 1,
    "reduce_scatter": 1, "gather": 0, "scatter": 1, "all_to_all": 1,
}
_OBJECT_OPS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
_FUNCTIONAL = (
    "all_reduce", "all_reduce_", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast", "broadcast_",
)


@dataclass(frozen=True)
class Call:
    """One recorded call: operation, bytes this rank handed over, group size, peer (point-to-point)."""

    op: str
    nbytes: int
    group_size: int
    peer: Optional[int] = None
    thread: str = ""


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _group_size(group: Any) -> int:
    try:
        return dist.get_world_size(group)
    except Exception:  # noqa: BLE001 - a functional collective's group given by name
        return -1


class WireCounter:
    """Records torch.distributed calls of this process while active (see the module docstring)."""

    def __init__(self, *, functional: bool = False) -> None:
        self.functional = functional
        self.records: list[Call] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode = None

    # -- recording ----------------------------------------------------------------------------
    def _record(self, call: Call) -> None:
        with self._lock:
            self.records.append(call)

    def _wrap(self, name: str, fn):
        counter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if depth == 0:
                counter._record(counter._describe(name, args, kwargs))
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        return wrapper

    def _describe(self, name: str, args, kwargs) -> Call:
        thread = threading.current_thread().name
        if name == "batch_isend_irecv":
            ops = args[0] if args else kwargs["p2p_op_list"]
            # one record per op, so sends and receives are told apart
            for op in ops[:-1]:
                self._record(Call(getattr(op.op, "__name__", str(op.op)), _nbytes(op.tensor), 2, op.peer, thread))
            last = ops[-1] if ops else None
            if last is None:
                return Call("batch_isend_irecv", 0, 2, None, thread)
            return Call(getattr(last.op, "__name__", str(last.op)), _nbytes(last.tensor), 2, last.peer, thread)
        group = kwargs.get("group")
        if name in _OBJECT_OPS:
            return Call(name, 0, _group_size(group), None, thread)
        index = _TENSOR_ARG.get(name, 0)
        keys = {0: ("tensor", "output_tensor_list", "tensor_list"), 1: ("tensor", "input_tensor", "input", "input_list")}
        tensor = args[index] if len(args) > index else next((kwargs[k] for k in keys[index] if k in kwargs), None)
        peer = None
        if name in ("send", "isend", "recv", "irecv"):
            peer = args[1] if len(args) > 1 else kwargs.get("dst", kwargs.get("src"))
            group = args[2] if len(args) > 2 else group
        elif name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
            group = args[2] if len(args) > 2 and not isinstance(args[2], bool) and name != "broadcast" else group
        return Call(name, _nbytes(tensor), _group_size(group), peer, thread)

    # -- entering / leaving -----------------------------------------------------------------------
    def __enter__(self) -> "WireCounter":
        names = list(_TENSOR_ARG) + list(_OBJECT_OPS) + ["batch_isend_irecv"]
        wrappers: dict[int, Any] = {}  # one wrapper per function: P2POp checks `op in (isend, irecv)` by identity
        for module in (dist, c10d):
            for name in names:
                fn = getattr(module, name, None)
                if fn is None:
                    continue
                if id(fn) not in wrappers:  # an active counter's wrapper is wrapped again: counters nest
                    wrappers[id(fn)] = self._wrap(name, fn)
                self._saved.append((module, name, fn))
                setattr(module, name, wrappers[id(fn)])
        if self.functional:
            self._mode = _FunctionalCollectives(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        """Stop counting (counters nest: leave them in the reverse order of entering)."""
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    # -- reading --------------------------------------------------------------------------------
    def calls(self, ops: Optional[Iterable[str]] = None) -> list[Call]:
        with self._lock:
            records = list(self.records)
        if ops is None:
            return records
        ops = set(ops)
        return [c for c in records if c.op in ops]

    def bytes(self, ops: Optional[Iterable[str]] = None) -> int:
        """Total bytes handed over in calls of ``ops`` (default: every call)."""
        return sum(c.nbytes for c in self.calls(ops))

    def summary(self) -> dict[str, tuple[int, int]]:
        """``{op: (calls, bytes)}``."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.calls():
            n, b = out.get(c.op, (0, 0))
            out[c.op] = (n + 1, b + c.nbytes)
        return out


def _functional_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class _FunctionalCollectives(_functional_mode_base()):
    """Records ``torch.ops._c10d_functional`` collectives (DTensor's) issued in this thread."""

    def __init__(self, counter: WireCounter) -> None:
        super().__init__()
        self.counter = counter
        namespace = torch.ops._c10d_functional
        self.ops = {}
        for name in _FUNCTIONAL:
            packet = getattr(namespace, name, None)
            if packet is not None:
                for overload in packet.overloads():
                    self.ops[getattr(packet, overload)] = "functional." + name.rstrip("_")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run; the collectives it issues come back here as plain tensors
        name = self.ops.get(func)
        if name is not None:
            self.counter._record(Call(name, _nbytes(args[0]) if args else 0, -1, None, threading.current_thread().name))
        return func(*args, **kwargs)


def step_window(step: int, *, functional: bool = False):
    """A Lightning callback whose ``wire`` (a :class:`WireCounter`) counts training step ``step`` only
    (from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step), e.g. to
    leave out the first step's shape inference."""
    import lightning.pytorch as pl

    class _StepWindow(pl.Callback):
        def __init__(self) -> None:
            self.wire = WireCounter(functional=functional)
            self._open = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == step and not self._open:
                self.wire.__enter__()
                self._open = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._open:
                self.wire.__exit__(None, None, None)
                self._open = False

    return _StepWindow()
