"""Elastic resume: checkpoints every K steps written in the background, and ``resume="auto"``.

A run that loses a node restarts (``torchrun --max-restarts N --nnodes 1:2``, or by hand) at the new
world size and resumes from the newest complete checkpoint of its checkpoint directory. Our
checkpoints are DCP directories keyed by the unsplit model's parameter names
(:mod:`lightning_distnn.checkpoint`), so they reload at any layout: the data-parallel degree
shrinks, Lightning's sampler re-partitions the data over the survivors, nothing else changes.
At most ``every_n_steps`` steps of work are lost.

Usage (the same script for the first start and every restart)::

    from lightning_distnn.elastic import ElasticCheckpoint, resume_path

    ckpt = ElasticCheckpoint(dirpath="runs/x/elastic", every_n_steps=50)
    trainer = Trainer(strategy="distnn_dp", callbacks=[ckpt], ...)
    trainer.fit(model, data, ckpt_path=resume_path("auto", ckpt.dirpath))

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1:2 --nproc-per-node 2 --max-restarts 3 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29400 train.py

(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: see :func:`shared_store_warning`.)
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Optional, Union

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_distnn._compat import lightning_checkpoint, unwrap_optimizers
from lightning_distnn.checkpoint import (
    newest_complete_checkpoint,
    save_distributed,
    save_distributed_async,
    scan_checkpoints,
)

__all__ = ["ElasticCheckpoint", "resume_path", "shared_store_warning", "steps_lost"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def shared_store_warning(environ: Optional[dict] = None) -> Optional[str]:
    """Why restarts under this torchrun may fail, or None.

    torchrun's c10d rendezvous shares its agent's TCPStore with the workers (since torch 2.5), without a
    prefix per restart: a restarted worker may read the gloo addresses that the attempt before wrote and
    fail in ``new_group`` with "Connection refused" (pytorch/pytorch#135712, #167288). Started with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, every attempt gets a store of its own.
    """
    env = os.environ if environ is None else environ
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max-restarts {restarts} with its rendezvous store shared with the workers: a restarted "
                "worker may connect to the addresses of the attempt before and fail ('Connection refused'). Start "
                "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (pytorch/pytorch#135712).")
    return None


def resume_path(resume: Union[None, str, os.PathLike], dirpath: Union[str, os.PathLike]) -> Optional[str]:
    """What ``trainer.fit(ckpt_path=...)`` should get for the option ``resume``.

    ``None``/``"never"``: start fresh. ``"auto"``: the newest complete checkpoint under ``dirpath``
    (checkpoints that are incomplete or corrupt are skipped with a warning), or None for a first
    start. A path: that checkpoint, which must exist. Every rank computes the same answer from the
    shared file system (call it before training starts, when no save is in flight).
    """
    if resume is None or resume == "never":
        return None
    problem = shared_store_warning()
    if problem is not None:
        warnings.warn(problem, stacklevel=2)
    if resume == "auto":
        found = newest_complete_checkpoint(dirpath)
        return str(found) if found is not None else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(
            f"resume={str(resume)!r} does not exist: pass a checkpoint directory or file, 'auto' (the newest complete "
            f"checkpoint under {dirpath}, if any) or None."
        )
    return str(path)


def steps_lost(killed_at_step: int, resumed_from_step: Optional[int]) -> int:
    """Optimizer steps trained before a failure at ``killed_at_step`` that a resume repeats."""
    return killed_at_step - (resumed_from_step or 0)


class ElasticCheckpoint(Callback):
    """Save a DCP checkpoint every ``every_n_steps`` optimizer steps, asynchronously, into ``dirpath/step-<n>``.

    Args:
        dirpath: the run's checkpoint directory (shared by all nodes).
        every_n_steps: K, the interval; a restart loses at most K steps.
        keep: complete checkpoints to keep (older ones are deleted by rank 0); ``None`` keeps all.
        async_save: write with ``dcp.async_save`` on a process group of its own, so training does
            not wait for the disk (it waits only to copy the state to memory). ``False``: synchronous.

    Works with the strategies that save DCP checkpoints (all of lightning_distnn's); the saved
    ``meta.pt`` holds Lightning's loop state, so ``trainer.fit(ckpt_path=...)`` resumes the loops.
    """

    def __init__(
        self,
        dirpath: Union[str, os.PathLike],
        *,
        every_n_steps: int = 50,
        keep: Optional[int] = 2,
        async_save: bool = True,
    ) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer (K steps between checkpoints).")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep={keep!r} must be a positive integer (checkpoints kept), or None to keep all.")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.keep, self.async_save = every_n_steps, keep, async_save
        self._pending: Optional[Future] = None
        self._staged: Optional[Future] = None
        self._stager = None
        self._group = None
        self.saved_steps: list[int] = []
        self.blocked_s: list[float] = []  # seconds the training loop waited per checkpoint

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.async_save and dist.is_available() and dist.is_initialized() and self._group is None:
            # the writer thread's collectives must never interleave with training's on one group
            self._group = dist.new_group(backend="gloo")
        if self.async_save and self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # the copy to memory happens in the background too; it is waited for before the next optimizer step
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=False))

    def _optimizers(self, trainer) -> list:
        return unwrap_optimizers(trainer.optimizers)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; re-raise its error."""
        self._staged = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or (self.saved_steps and self.saved_steps[-1] == step):
            return
        import time

        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        checkpoint = lightning_checkpoint(trainer)
        extra = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        describe = getattr(trainer.strategy, "describe", None)
        kwargs = dict(extra=extra, step=step, layout=describe() if callable(describe) else type(trainer.strategy).__name__)
        path = self.dirpath / f"step-{step:08d}"
        if self.async_save:
            self._pending = save_distributed_async(path, pl_module, self._optimizers(trainer),
                                                   process_group=self._group, stager=self._stager, **kwargs)
            self._staged = getattr(self._pending, "staged", None)
        else:
            save_distributed(path, pl_module, self._optimizers(trainer), **kwargs)
        self.blocked_s.append(time.perf_counter() - start)
        self.saved_steps.append(step)
        if trainer.is_global_zero:
            self._prune(exclude=path)

    def _prune(self, exclude: Path) -> None:
        if self.keep is None:
            return
        complete = [s.path for s in scan_checkpoints(self.dirpath, verify=False)
                    if s.complete and _STEP_DIR.match(s.path.name) and s.path != exclude]
        for old in complete[self.keep - 1:]:  # the new one (in flight or just written) is the keep-th
            shutil.rmtree(old, ignore_errors=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._staged is not None:  # the state being copied must not change under the copy
            import time

            start = time.perf_counter()
            self._staged.result()
            self._staged = None
            if self.blocked_s:
                self.blocked_s[-1] += time.perf_counter() - start

    def on_train_end(self, trainer, pl_module) -> None:
        self.wait()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # leave a save in flight alone: its ``.partial`` directory is never taken for a checkpoint
        self._pending = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pending is not None:
            self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

