"""Distributed checkpoints (torch.distributed.checkpoint) that reload at another layout.

A checkpoint is a directory: DCP's ``.metadata`` plus one ``__<rank>_0.distcp`` file per writing
rank, and ``meta.pt`` (anything else, e.g. Lightning's loop state, written by rank 0). Sharded
parameters are stored as their shards with the full shape in the metadata, so a checkpoint saved at
``tp=2`` loads into ``tp=1`` (one process, no process group), ``tp=4``, a pipeline stage or a hybrid
layout: DCP reads into whatever shards the loading module holds.

Usage (any strategy, any layout, also one process without ``torch.distributed``)::

    save_distributed("ckpt/step3", model, [optimizer], extra={"step": 3})
    extra = load_distributed("ckpt/step3", model, [optimizer])

A checkpoint cannot be half-written: it is written into the hidden sibling ``.<name>.partial`` and
renamed to ``<name>`` only when every rank's data, ``meta.pt`` and ``manifest.json`` are on disk. The
manifest holds the step, the layout, the model signature (tensor names and global shapes) and the
size and CRC32 of every file; :func:`newest_complete_checkpoint` skips (and names) a checkpoint that is
incomplete or corrupt, and loading a checkpoint of another model or a corrupt file says which file,
which parameter and what was expected. :func:`save_distributed_async` writes with DCP's ``async_save``:
training goes on while a background thread writes and rank 0 completes the checkpoint.

Model keys are the module's fully qualified parameter names (``net.0.0.weight``), optimizer
states are keyed by the same names (DCP's ``get_optimizer_state_dict``), so both survive a change of
layout. Only pass the part of a model this rank holds (e.g. a pipeline stage): keys it lacks are
simply not read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import warnings
import zlib
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

META_FILE = "meta.pt"
MANIFEST_FILE = "manifest.json"
MODEL_KEY = "model"
PARTIAL_SUFFIX = ".partial"

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointStatus",
    "ForeignCheckpointError",
    "MANIFEST_FILE",
    "META_FILE",
    "check_checkpoint",
    "is_distributed_checkpoint",
    "load_distributed",
    "model_signature",
    "newest_complete_checkpoint",
    "save_distributed",
    "save_distributed_async",
    "scan_checkpoints",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: incomplete, corrupt, or of another model (the message says which file)."""


class ForeignCheckpointError(CheckpointError, KeyError):
    """A checkpoint of another model (other tensor names or shapes); a KeyError too, as before manifests."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _optim_key(index: int) -> str:
    return f"optimizer_{index}"


def _rank(process_group=None) -> int:
    """This process's rank in the writing group (its rank 0 completes a checkpoint, like DCP's coordinator)."""
    return dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0


def _barrier(process_group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=process_group)


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_distributed_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a directory written by :func:`save_distributed` (has DCP's ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def _partial(path: Path) -> Path:
    return path.parent / f".{path.name}{PARTIAL_SUFFIX}"


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign .metadata
        raise CheckpointError(
            f"{path / '.metadata'} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            "the checkpoint is corrupt or incomplete. Load another one (newest_complete_checkpoint(dir) finds the "
            "newest good checkpoint of a run)."
        ) from exc


def _saved_shapes(metadata) -> dict[str, tuple[int, ...]]:
    """Model tensor name -> global shape, from DCP's metadata."""
    prefix = MODEL_KEY + "."
    return {
        key[len(prefix):]: tuple(md.size)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(md, "size")
    }


def model_signature(module: nn.Module) -> dict[str, list[int]]:
    """Names and global shapes (DTensors: unsharded) of the tensors this rank holds of ``module``."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    return {name: list(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def _finalize(tmp: Path, path: Path, *, meta: bytes, step: Optional[int], layout: Optional[str]) -> None:
    """Rank 0, once every rank's data is written: meta.pt, manifest.json, then the rename that completes it."""
    (tmp / META_FILE).write_bytes(meta)
    signature = {k: list(v) for k, v in _saved_shapes(_read_metadata(tmp)).items()}
    files = {
        f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)}
        for f in sorted(tmp.iterdir())
        if f.is_file() and f.name != MANIFEST_FILE
    }
    manifest = {"format": 1, "step": step, "layout": layout, "time": time.time(), "signature": signature,
                "files": files}
    with open(tmp / (MANIFEST_FILE + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / (MANIFEST_FILE + ".tmp"), tmp / MANIFEST_FILE)
    old = None
    if path.exists():  # overwrite: move the old one aside first, so a crash leaves one of the two whole
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare(path: Union[str, os.PathLike], module, optimizers, extra, step, process_group):
    path = Path(path)
    if path.is_file():
        raise FileExistsError(
            f"checkpoint path {path} is a file; a distributed checkpoint is a directory: remove the file or pick "
            "another path."
        )
    tmp = _partial(path)
    if _rank(process_group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that died
        tmp.mkdir(parents=True)
    _barrier(process_group)
    options = StateDictOptions(full_state_dict=False)
    state: dict[str, Any] = {MODEL_KEY: get_model_state_dict(module, options=options)}
    for i, optimizer in enumerate(optimizers):
        state[_optim_key(i)] = get_optimizer_state_dict(module, optimizer, options=options)
    meta = dict(extra or {})
    meta["_distnn_optimizers"] = len(optimizers)
    if step is None:
        step = meta.get("global_step")
    buffer = io.BytesIO()
    if _rank(process_group) == 0:
        torch.save(meta, buffer)  # now: training changes the loop state while an async save writes
    return path, tmp, state, buffer.getvalue(), step


def save_distributed(
    path: Union[str, os.PathLike],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    extra: Optional[dict[str, Any]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    step: Optional[int] = None,
    layout: Optional[str] = None,
) -> Path:
    """Write ``module`` (and ``optimizers``) to the DCP directory ``path``; every rank must call it.

    ``extra`` (plain picklable data, e.g. epoch and loop state) goes to ``path/meta.pt`` from rank 0.
    ``process_group`` is the group that writes (default: the world; ``None`` works without
    ``torch.distributed`` too). ``step`` (default ``extra["global_step"]``) and ``layout`` (e.g. the
    strategy's ``describe()``) go to the manifest. ``path`` appears only once complete.
    """
    path, tmp, state, meta, step = _prepare(path, module, optimizers, extra, step, process_group)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
    if _rank(process_group) == 0:
        _finalize(tmp, path, meta=meta, step=step, layout=layout)
    _barrier(process_group)
    return path


def save_distributed_async(
    path: Union[str, os.PathLike],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    extra: Optional[dict[str, Any]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    step: Optional[int] = None,
    layout: Optional[str] = None,
    stager=None,
) -> Future:
    """:func:`save_distributed` with DCP's ``async_save``: returns once the state is copied to memory.

    A background thread writes; on rank 0 the returned future completes once the checkpoint is
    complete (renamed to ``path``), on the others once their part is written. Wait for it before the
    next save and before the process exits. Pass a ``process_group`` of its own (``dist.new_group(
    backend="gloo")``), so the writer's collectives never interleave with training's.

    ``stager``: a DCP ``AsyncStager``, e.g. ``DefaultStager(StagingOptions(use_async_staging=True))``,
    reused across saves (close it after the last). With async staging even the copy to memory
    happens in the background: the returned future's ``staged`` future must be waited for before
    the parameters or the optimizer state change (before the next ``optimizer.step()``).
    """
    path, tmp, state, meta, step = _prepare(path, module, optimizers, extra, step, process_group)
    with _quiet_single_process():
        upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=process_group, async_stager=stager)
    staged: Future = Future()
    staged.set_result(None)
    if hasattr(upload, "upload_completion"):  # AsyncSaveResponse: staging goes on in the background
        staged, upload = upload.staging_completion, upload.upload_completion
    if _rank(process_group) != 0:
        upload.staged = staged
        return upload
    done: Future = Future()
    done.staged = staged

    def complete(fut: Future) -> None:
        try:
            fut.result()
            _finalize(tmp, path, meta=meta, step=step, layout=layout)
            done.set_result(path)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            log.error("checkpoint %s was not completed: %s", path, exc)
            done.set_exception(exc)

    upload.add_done_callback(complete)
    return done


@dataclass
class CheckpointStatus:
    """One checkpoint directory of a run, and why it cannot be resumed from (``problem``), if so."""

    path: Path
    step: Optional[int]
    problem: str = ""

    @property
    def complete(self) -> bool:
        return not self.problem


def _manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint was not completed (its writer stopped).")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt ({exc}).") from exc


def check_checkpoint(path: Union[str, os.PathLike], *, verify: bool = True) -> list[str]:
    """Problems of the checkpoint ``path`` (empty: complete): missing manifest or files, wrong sizes,
    and with ``verify`` wrong CRC32s. Each names the file."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        return [f"{path} is a partial write (its writer did not finish)"]
    try:
        manifest = _manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for name, want in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != want["bytes"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)")
        elif verify and _crc32(file) != want["crc32"]:
            problems.append(f"{file} is corrupt: its CRC32 is {_crc32(file):#010x}, the manifest says {want['crc32']:#010x}")
    return problems


def scan_checkpoints(directory: Union[str, os.PathLike], *, verify: bool = True) -> list[CheckpointStatus]:
    """Every checkpoint (and partial write) under ``directory``, newest first (by manifest step, then time)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for sub in directory.iterdir():
        if not sub.is_dir() or (sub.name.startswith(".") and not sub.name.endswith(PARTIAL_SUFFIX)):
            continue
        problems = check_checkpoint(sub, verify=verify)
        step = None
        if not problems:
            step = _manifest(sub).get("step")
        found.append((step if step is not None else -1, sub.stat().st_mtime, CheckpointStatus(sub, step, "; ".join(problems))))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [status for _, _, status in found]


def newest_complete_checkpoint(directory: Union[str, os.PathLike], *, verify: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under ``directory`` (or None); logs a warning for each newer one skipped.

    Incomplete ones (a writer killed mid-save leaves a ``.<name>.partial`` directory or no manifest) and
    corrupt ones (a file missing, truncated, or with another CRC32 than its manifest says) are skipped.
    """
    statuses = scan_checkpoints(directory, verify=verify)
    complete = [s for s in statuses if s.complete]
    best = max(complete, key=lambda s: (s.step if s.step is not None else -1, s.path.stat().st_mtime), default=None)
    for s in statuses:
        if not s.complete and (best is None or s.path.stat().st_mtime >= best.path.stat().st_mtime):
            log.warning("skipping checkpoint %s: %s", s.path, s.problem)
    return best.path if best is not None else None


def load_distributed(
    path: Union[str, os.PathLike],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    strict: bool = True,
    process_group: Optional[dist.ProcessGroup] = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Read the DCP directory ``path`` into ``module`` (and ``optimizers``) at this process's layout.

    The module may be sharded differently from the one saved (another ``tp``), or be a plain module
    on one process without ``torch.distributed``. Returns the ``extra`` dict saved with it.
    ``strict`` fails on keys this module has and the checkpoint lacks, and on tensors whose shapes
    differ. With a manifest, its files are checked first (``verify``: their CRC32 too), so a corrupt
    file fails on every rank alike, naming the file, before any collective.
    """
    path = Path(path)
    if not is_distributed_checkpoint(path):
        hint = ""
        if _partial(path).is_dir():
            hint = f" ({_partial(path)} exists: its writer did not finish)"
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (a directory with DCP's .metadata){hint}: pass the directory "
            "that save_distributed / the strategy's save_checkpoint wrote, or newest_complete_checkpoint(run_dir)."
        )
    if (path / MANIFEST_FILE).is_file():
        problems = check_checkpoint(path, verify=verify)
        if problems:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded: {'; '.join(problems)}. Use another checkpoint "
                "(newest_complete_checkpoint(run_dir) skips broken ones)."
            )
    meta_file = path / META_FILE
    try:
        meta = torch.load(meta_file, weights_only=False) if meta_file.is_file() else {}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{meta_file} cannot be read ({type(exc).__name__}: {exc}): the checkpoint is corrupt.") from exc
    saved_optimizers = meta.pop("_distnn_optimizers", None)
    if optimizers and saved_optimizers is not None and saved_optimizers < len(optimizers):
        raise ValueError(
            f"{path} holds the state of {saved_optimizers} optimizer(s), {len(optimizers)} were given to load: "
            "load without optimizers (weights only) or pass as many as were saved."
        )
    options = StateDictOptions(full_state_dict=False, strict=strict)
    state: dict[str, Any] = {MODEL_KEY: get_model_state_dict(module, options=options)}
    for i, optimizer in enumerate(optimizers):
        state[_optim_key(i)] = get_optimizer_state_dict(module, optimizer, options=options)
    saved = _saved_shapes(_read_metadata(path))
    missing = sorted(k for k in state[MODEL_KEY] if k not in saved)
    wrong = [
        (k, saved[k], tuple(t.shape))
        for k, t in state[MODEL_KEY].items()
        if k in saved and isinstance(t, torch.Tensor) and tuple(t.shape) != saved[k]
    ]
    if (missing or wrong) and strict:
        lines = [f"{k}: saved {list(s)}, this model has {list(o)}" for k, s, o in wrong[:3]]
        if missing:
            lines.append(f"it lacks {len(missing)} tensors of this model (first: {', '.join(missing[:3])}); "
                         f"it holds e.g. {', '.join(sorted(saved)[:3])}")
        raise ForeignCheckpointError(
            f"checkpoint {path} (per {path / '.metadata'}) was saved from another model: " + "; ".join(lines)
            + ". Load it into the model it was saved from, or pass strict=False to load only the tensors that match."
        )
    for key in missing + [k for k, _, _ in wrong]:
        state[MODEL_KEY].pop(key)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), process_group=process_group)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP wraps per-rank errors (a BaseException)
        files = sorted(f.name for f in path.glob("*.distcp"))
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); its data "
            f"files are {', '.join(files)} and it has no manifest to check them against: it is corrupt or "
            "incomplete. Use another checkpoint."
        ) from exc
    set_model_state_dict(module, state[MODEL_KEY], options=options)
    for i, optimizer in enumerate(optimizers):
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        set_optimizer_state_dict(module, optimizer, state[_optim_key(i)], options=options)
        # DCP keeps one copy of non-tensor entries: the param groups written by rank 0. Where ranks hold
        # different parameters (pipeline stages), a group of this rank's parameters comes back without its
        # hyper-parameters: take them from the optimizer as configured for this run.
        for group, own in zip(optimizer.param_groups, hyper):
            for key, value in own.items():
                group.setdefault(key, value)
    return meta
