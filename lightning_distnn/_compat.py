"""Every touch of a private Lightning or torch API, in one place.

Each entry says where it is used, the versions it was checked against (Lightning 2.6.6 and
torch 2.14.1 unless noted; the package declares lightning>=2.4, torch>=2.5) and what breaks if
it changes. Nothing else in the package imports a ``_private`` name of Lightning or torch, sets
an attribute of theirs that starts with ``_``, or replaces a method of one of their objects, with
two exceptions that document their own: ``parallel/pipeline/overlap.py`` (built throughout on
torch's private pipeline action runtime) and ``testing/wire.py`` (a test utility recording
functional collectives with torch's dispatch mode). ``tests/test_packaging.py`` fails on any other
private import.
"""

from __future__ import annotations

import contextlib
import random
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# -- Lightning ---------------------------------------------------------------------------------

# (Lightning is imported inside the functions: lightning_distnn.parallel, which uses the torch
# entries below, stays importable with torch alone.)


def optimizers_to_device(optimizers, device) -> None:
    """FeatureParallelStrategy.setup: move optimizer state to the device, as DDPStrategy.setup does
    (``lightning.fabric.utilities.optimizer._optimizers_to_device``, Lightning 2.0-2.6). If it moves
    or is renamed: ImportError at the first setup (loud, not silent)."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


def sync_module_states(module) -> None:
    """ParameterServerStrategy: broadcast rank 0's parameters and buffers when the model is not
    DDP-wrapped (``lightning.pytorch.overrides.distributed._sync_module_states``, Lightning 2.0-2.6).
    If it moves: ImportError at the first setup."""
    from lightning.pytorch.overrides.distributed import _sync_module_states

    _sync_module_states(module)


def strategy_timeout(strategy) -> "timedelta":
    """The timeout a Lightning ``DDPStrategy`` was built with (its ``_timeout``, Lightning 2.0-2.6; the
    base class sets it from our ``timeout`` argument). If renamed: AttributeError at setup."""
    return strategy._timeout


def skip_per_batch_sigterm_broadcast(trainer) -> None:
    """Asynchronous parameter server: Lightning's training loop broadcasts a SIGTERM flag from rank 0
    before every batch (``_TrainingEpochLoop._broadcast_sigterm_tensor``), which locks all ranks into
    step. Turn that off for this trainer's fit loop (overridden on the instance only). Cost: a SIGTERM
    on one rank is not forwarded to the others; the parameter server then ends the job on the dead
    peer instead. If Lightning renames the method, the assignment is harmless and async degrades to
    lock-step (still correct, slower): ``tests/test_param_server.py`` checks that workers run ahead."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def check_model_before_launch(launcher, check: Callable[[Any], None]) -> None:
    """Run ``check(model)`` in the launching process before the launcher starts any child.

    Lightning hands the LightningModule to ``launcher.launch(function, trainer, model, ...)``; the
    strategy sees the model only later, inside each process. We wrap ``launch`` on this launcher
    instance (``_SubprocessScriptLauncher``/``_MultiProcessingLauncher`` both take the model as the
    second positional argument after the trainer function's own). If the argument order changes the
    check is skipped here and still runs on every rank in ``connect`` (later, per rank, not lost).
    """
    if launcher is None:
        return
    launch = launcher.launch

    def checked_launch(function, *args, **kwargs):
        import lightning.pytorch as pl

        model = next((a for a in args if isinstance(a, pl.LightningModule)), None)
        if model is not None:
            check(model)
        return launch(function, *args, **kwargs)

    launcher.launch = checked_launch


def replace_norm_clipping(precision_plugin, clip: Callable[[Any, float], None]) -> None:
    """Make ``precision_plugin.clip_grad_by_norm(optimizer, clip_val)`` call ``clip`` (model-parallel
    strategies clip by the norm over every rank's parameters). Lightning calls this method from
    ``Precision.clip_gradients`` (2.0-2.6). If it is renamed, clipping falls back to the local norm:
    ``tests/test_pipeline.py`` compares clipped pipeline training with one process and would fail."""
    precision_plugin.clip_grad_by_norm = clip


def set_device_mesh(module, mesh) -> None:
    """Expose the run's DeviceMesh as ``LightningModule.device_mesh`` (a property over ``_device_mesh``,
    which Lightning's ModelParallelStrategy sets the same way). If renamed: ``module.device_mesh`` is None."""
    module._device_mesh = mesh


def data_source(trainer, stage: str):
    """What Lightning will iterate for ``stage`` ("fit", "validate", "test", "predict"): the object
    the user passed (a DataLoader, an iterable, a list of them) or, for a LightningModule /
    LightningDataModule, the result of its ``*_dataloader`` hook. Reads the loops' ``_data_source``
    (Lightning 2.0-2.6). If it changes, this returns None and the caller falls back to the
    datamodule and module hooks (the strategy's error then names every entry point)."""
    loop = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}.get(stage)
    source = getattr(getattr(trainer, loop, None), "_data_source", None) if loop else None
    if source is None or getattr(source, "instance", None) is None:
        return None
    try:
        return source.dataloader()
    except Exception:  # noqa: BLE001 - a hook that fails before setup: let the caller try the others
        return None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global torch/python/numpy random states afterwards (a peek at data must not shift
    what the training draws). Public APIs only; listed here because it guards private behaviour:
    a DataLoader's RandomSampler draws its seed from the global torch generator."""
    state = random.getstate()
    try:
        import numpy as np

        np_state: Optional[Any] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)
            if np_state is not None:
                np.random.set_state(np_state)


# ---- faults: Lightning's launcher and its child-process observer (lightning_distnn.faults) ----------
# Lightning's ``_SubprocessScriptLauncher.launch`` (2.1-2.6) re-executes the script per local rank and starts
# a ``_ChildProcessObserver`` thread that, within 5 s of a child exiting non-zero, SIGKILLs every child *and
# the launching process*: rank 0 is often killed before it can name the dead rank. Our strategies use a
# subclass of that launcher whose observer waits ``termination_delay`` seconds first (the FaultMonitor sets
# it to its ``grace + 3``). If Lightning renames the launcher, the observer or the methods used here
# (``_call_children_scripts``, ``_terminate_all``), the strategies keep Lightning's own launcher (see
# :func:`patient_launcher`): the job still ends, only the one message can be cut short
# (tests/test_faults.py checks the message).

_PATIENT: dict = {}
_OBSERVER = {"stand_down": False}


def stand_down_observer() -> None:
    """From now on the observer kills only the children, not the launching process: ``trainer.fit`` raises
    ``RankFailedError`` there (``FaultMonitor(on_failure="raise")``) and the user's code goes on."""
    _OBSERVER["stand_down"] = True


def _terminate(observer, terminate_all) -> None:
    if not _OBSERVER["stand_down"]:
        terminate_all()
        return
    import signal

    for proc in observer._child_processes:
        proc.send_signal(signal.SIGKILL)


def _patient_launcher_class():
    """The launcher subclass (built on first use: Lightning is imported lazily here)."""
    if "cls" in _PATIENT:
        return _PATIENT["cls"]
    import os

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    class _PatientObserver(_ChildProcessObserver):
        def __init__(self, launcher, **kwargs) -> None:
            super().__init__(**kwargs)
            self._launcher = launcher

        def _terminate_all(self) -> None:
            time.sleep(self._launcher.termination_delay)  # rank 0 names the dead rank first
            _terminate(self, super()._terminate_all)

    class PatientSubprocessScriptLauncher(_SubprocessScriptLauncher):
        """Lightning's script launcher whose child-process observer waits ``termination_delay`` s after a
        child died before it SIGKILLs the others and the launching process (Lightning's waits 0-5 s)."""

        termination_delay: float = 5.0

        def launch(self, function, *args, trainer=None, **kwargs):
            self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
            if not self.cluster_environment.creates_processes_externally:
                self._call_children_scripts()
                _PatientObserver(self, main_pid=os.getpid(), child_processes=self.procs).start()
            _set_num_threads_if_needed(num_processes=self.num_processes)
            return function(*args, **kwargs)

    _PATIENT["cls"] = PatientSubprocessScriptLauncher
    return PatientSubprocessScriptLauncher


def patient_launcher(launcher):
    """``launcher`` as a :func:`_patient_launcher_class` instance when it is exactly Lightning's script
    launcher (``strategy="..."`` with the default ``start_method="popen"``); any other launcher (spawn,
    none) is returned as it is. Called by ``MeshStrategy._configure_launcher``."""
    try:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        cls = _patient_launcher_class()
    except (ImportError, AttributeError):  # Lightning moved things: keep its launcher
        return launcher
    if type(launcher) is not _SubprocessScriptLauncher:
        return launcher
    return cls(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)


def delay_child_observer(launcher, delay: float) -> None:
    """Make the launcher's child-process observer wait ``delay`` s before it kills the launching rank.

    Our launcher (:func:`patient_launcher`) has a public ``termination_delay``. Under a strategy that is
    not ours (e.g. Lightning's ``DDPStrategy`` with a ``FaultMonitor``) Lightning's observer thread is
    already running: its ``_terminate_all`` is wrapped on the running thread (the only instance wrap left;
    if Lightning renames the thread or the method, nothing is wrapped and the message can be cut short)."""
    if hasattr(type(launcher), "termination_delay"):
        launcher.termination_delay = delay
        return
    import threading

    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_terminate_all") \
                and not hasattr(thread, "_launcher"):
            original = thread._terminate_all

            def delayed(original=original, thread=thread):
                time.sleep(delay)
                _terminate(thread, original)

            thread._terminate_all = delayed


def launched_children(strategy) -> list:
    """The ``subprocess.Popen`` children the strategy's launcher started (``launcher.procs`` of Lightning's
    script launcher, 2.0-2.6); ``[]`` for other launchers, torchrun and SLURM (they start every rank)."""
    launcher = getattr(strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def strategy_timeout_or_none(strategy) -> Optional["timedelta"]:
    """:func:`strategy_timeout` for any Lightning strategy: None where it has no ``_timeout`` (e.g. single device)."""
    return getattr(strategy, "_timeout", None)


def unwrap_optimizers(optimizers) -> list:
    """The torch optimizers behind Lightning's ``LightningOptimizer`` wrappers (their ``_optimizer``,
    Lightning 2.0-2.6; ``trainer.optimizers`` holds plain ones in 2.x, this covers both). If renamed the
    wrapper is returned; DCP then fails loudly on its state dict."""
    return [getattr(o, "_optimizer", o) for o in optimizers]


def lightning_checkpoint(trainer) -> dict:
    """The dict Lightning would save for ``trainer`` now (``trainer._checkpoint_connector.dump_checkpoint``,
    Lightning 2.0-2.6): loop state, callbacks, hyper-parameters (``elastic.ElasticCheckpoint`` saves it
    asynchronously itself). If renamed: AttributeError at the first periodic checkpoint."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


# -- torch ---------------------------------------------------------------------------------------
# DTensor's local shard: public ``DTensor.to_local()`` is used everywhere (under no_grad it returns a
# view of the shard, so in-place updates reach the DTensor).
#
# Structural, not a function: the tensor-parallel styles subclass
# ``torch.distributed.tensor.parallel.ParallelStyle`` and implement its abstract ``_apply(module,
# device_mesh)`` and read its ``src_data_rank`` attribute, which is how ``parallelize_module`` calls a
# style (torch's own ``ColwiseParallel`` does the same). If ``parallelize_module`` stops calling
# ``_apply``, ``apply_tp`` raises ``TypeError`` (abstract class) or leaves layers unsharded; the
# equivalence tests in ``tests/test_tensor_parallel.py`` catch both.

_SWAPPED: dict = {}


def swap_forward(module, tag: str, forward: Callable) -> None:
    """Give ``module`` a cached subclass named ``{tag}{Base}`` whose ``forward`` is ``forward``.

    Assigns ``module.__class__`` (FSDP2's ``fully_shard`` does the same). The module keeps its
    parameters, hooks, ``repr`` and ``isinstance(module, Base)``; only the forward changes. Checked:
    torch 2.14.1. If ``nn.Module`` ever forbids ``__class__`` assignment, this raises ``TypeError`` at
    ``apply_tp``; the fallback is a wrapping parent module, which changes state-dict keys (checkpoints).
    """
    base = type(module)
    key = (base, tag)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{tag}{base.__name__}", (base,), {"forward": forward, "__module__": base.__module__})
    module.__class__ = _SWAPPED[key]


def conv2d_forward(conv, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv`` applied to ``x`` with the given (local shard) ``weight`` and ``bias``.

    Uses ``nn.Conv2d._conv_forward(input, weight, bias)``, which applies the layer's stride, dilation,
    groups and padding, including ``padding_mode`` other than ``"zeros"``. Checked: torch 2.14.1
    (present since 1.8). If renamed, every sharded convolution fails with ``AttributeError`` at its
    first forward; the replacement is ``F.conv2d`` with those attributes and an explicit ``F.pad``.
    """
    return conv._conv_forward(x, weight, bias)


# -- torch.distributed.pipelining (the pipeline timeline only; numerics never depend on it) ------
# Checked against torch 2.14.1 (torch/distributed/pipelining/stage.py and schedules.py).
#
# The one place the pipeline runtime touches private ``torch.distributed.pipelining`` API.
#
# Checked against torch 2.14.1 (``torch/distributed/pipelining/stage.py`` and ``schedules.py``).
# The lead moves this into ``lightning_distnn/_compat.py``. Two touches, both for the timeline only:
#
# :func:`wrap_stage_tasks` replaces three methods of one ``PipelineStage`` *instance* (not the
# class) with timed wrappers:
#
# * ``forward_one_chunk(fwd_chunk_id, args, kwargs, ...)``: an F task;
# * ``backward_one_chunk(bwd_chunk_id, loss=None, full_backward=True, last_backward=False)``: a B
#   task (``full_backward=True``) or an I task (input gradient only, zero-bubble schedules);
# * ``backward_weight_one_chunk(bwd_chunk_id, last_backward=False)``: a W task.
#
# Every schedule class (single-stage and the ``_PipelineScheduleRuntime`` ones) calls these
# methods on the stage object, so the wrappers see every task. What breaks if torch changes them:
# a renamed method raises ``AttributeError`` here when the stage is built (loud, at the first
# step); a moved chunk-id argument (today the first positional one) or a renamed
# ``full_backward`` keyword mislabels tasks in the timeline (B vs I, the micro-batch index); a
# schedule that stops calling these methods leaves the timeline empty (the bubble reads NaN).
# Numerics never depend on this: the wrappers pass every argument and result through unchanged.
#
# :func:`time_stage_p2p` times the stage's communication: it wraps the stage instance's public
# ``get_fwd_recv_ops`` / ``get_bwd_recv_ops`` / ``get_fwd_send_ops`` / ``get_bwd_send_ops`` to tag
# the ``P2POp`` objects they return, and replaces, once per process, the private module function
# ``torch.distributed.pipelining.schedules._batch_p2p`` (through which every schedule, single-stage
# and runtime, issues its point-to-point ops, also via ``_sorted_batch_p2p``) by a wrapper that
# returns, for tagged ops, ``Work`` objects whose ``wait()`` is timed: time blocked receiving
# (kind ``R``, with the stage it came from; a batch that mixes sends and a receive, as 1F1B's
# steady state does, counts as receiving: its sends complete only when the peer is ready) and
# sending (kind ``S``: posting, and waiting on a batch of sends only). Untagged ops
# (other stages, other code) pass through untouched. What breaks if torch changes: a renamed or
# removed ``_batch_p2p`` leaves the communication untimed (we check for it and then skip the
# patch: the timeline shows compute only); a schedule that calls something other than ``wait()``
# on the works (today only ``wait()`` is called, in ``_wait_batch_p2p`` and the schedules) would
# need the wrapper to forward it (``__getattr__`` forwards everything else).





# on_task(stage_index, microbatch, kind, start, end) with kind in "F", "B", "I", "W"
TaskCallback = Callable[[int, int, str, float, float], None]


def wrap_stage_tasks(stage: "PipelineStage", on_task: TaskCallback) -> None:
    """Call ``on_task`` with the wall span of every F/B/I/W task ``stage`` runs (see the module docstring)."""
    index = stage.stage_index
    forward = stage.forward_one_chunk
    backward = stage.backward_one_chunk
    backward_weight = stage.backward_weight_one_chunk

    def timed_forward(fwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = forward(fwd_chunk_id, *args, **kwargs)
        on_task(index, fwd_chunk_id, "F", start, time.perf_counter())
        return out

    def timed_backward(bwd_chunk_id, *args, **kwargs):
        full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
        start = time.perf_counter()
        out = backward(bwd_chunk_id, *args, **kwargs)
        on_task(index, bwd_chunk_id, "B" if full else "I", start, time.perf_counter())
        return out

    def timed_backward_weight(bwd_chunk_id, *args, **kwargs):
        start = time.perf_counter()
        out = backward_weight(bwd_chunk_id, *args, **kwargs)
        on_task(index, bwd_chunk_id, "W", start, time.perf_counter())
        return out

    stage.forward_one_chunk = timed_forward
    stage.backward_one_chunk = timed_backward
    stage.backward_weight_one_chunk = timed_backward_weight


# on_comm(stage_index, peer_stage, microbatch, kind, start, end) with kind "R" (receive) or "S" (send)
CommCallback = Callable[[int, int, int, str, float, float], None]
_TAG = "_distnn_timing"  # attribute set on the P2POp objects of instrumented stages


class _TimedWork:
    """A ``dist.Work`` whose ``wait()`` reports its blocked time to the op's callback."""

    def __init__(self, work: Any, tag: tuple) -> None:
        self._work, self._tag = work, tag

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        on_comm, stage, peer, mb, kind = self._tag
        on_comm(stage, peer, mb, kind, start, time.perf_counter())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _install_batch_p2p_timing() -> bool:
    from torch.distributed.pipelining import schedules as _schedules

    original = getattr(_schedules, "_batch_p2p", None)
    if original is None:
        return False
    if getattr(original, "_distnn_timed", False):
        return True

    def timed_batch_p2p(p2p_ops, desc=None):
        tags = [getattr(op, _TAG, None) for op in p2p_ops]
        if not any(tags):
            return original(p2p_ops, desc=desc)
        start = time.perf_counter()
        works = original(p2p_ops, desc=desc)
        end = time.perf_counter()
        sends = [t for t in tags if t is not None and t[4] == "S"]
        recv = [t for t in tags if t is not None and t[4] == "R"]
        if sends:  # posting a batch with sends (gloo may block here): sending, or receiving if it has a receive
            on_comm, stage, peer, mb, kind = (recv or sends)[0]
            on_comm(stage, peer, mb, kind, start, end)
        if recv or len(works) != len(p2p_ops):
            # a batch with a receive is waited on as a unit (the sends in it complete when the peer posts
            # its matching receive): all of its wait is blocked receiving; a coalesced batch (NCCL) has one work
            tag = (recv or sends)[0]
            return [_TimedWork(w, tag) for w in works]
        return [w if t is None else _TimedWork(w, t) for w, t in zip(works, tags)]

    timed_batch_p2p._distnn_timed = True
    _schedules._batch_p2p = timed_batch_p2p
    return True


def time_stage_p2p(stage: "PipelineStage", on_comm: CommCallback) -> bool:
    """Time the point-to-point traffic of ``stage`` (see the module docstring); False if torch lacks the hook."""
    if not _install_batch_p2p_timing():
        return False
    index = stage.stage_index
    getters = {
        "get_fwd_recv_ops": ("R", index - 1),
        "get_bwd_recv_ops": ("R", index + 1),
        "get_fwd_send_ops": ("S", index + 1),
        "get_bwd_send_ops": ("S", index - 1),
    }
    for name, (kind, peer) in getters.items():
        original = getattr(stage, name)

        def tagged(chunk_id, *args, _original=original, _kind=kind, _peer=peer, **kwargs):
            ops = _original(chunk_id, *args, **kwargs)
            for op in ops:
                if isinstance(op, dist.P2POp):
                    setattr(op, _TAG, (on_comm, index, _peer, chunk_id, _kind))
            return ops

        setattr(stage, name, tagged)
    return True
