"""Every touch of a private Lightning or torch API, in one place.

Each entry says where it is used, the versions it was checked against (Lightning 2.6.6 and
torch 2.14.1 unless noted; the package declares lightning>=2.4, torch>=2.5) and what breaks if
it changes. Nothing else in the package imports a ``_private`` name of Lightning or torch, sets
an attribute of theirs that starts with ``_``, or replaces a method of one of their objects.
"""

from __future__ import annotations

import contextlib
import random
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch

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
