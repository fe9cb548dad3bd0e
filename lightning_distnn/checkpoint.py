"""Distributed checkpoints (torch.distributed.checkpoint) that reload at another layout.

A checkpoint is a directory: DCP's ``.metadata`` plus one ``__<rank>_0.distcp`` file per writing
rank, and ``meta.pt`` (anything else, e.g. Lightning's loop state, written by rank 0). Sharded
parameters are stored as their shards with the full shape in the metadata, so a checkpoint saved at
``tp=2`` loads into ``tp=1`` (one process, no process group), ``tp=4``, a pipeline stage or a hybrid
layout: DCP reads into whatever shards the loading module holds.

Usage (any strategy, any layout, also one process without ``torch.distributed``)::

    save_distributed("ckpt/step3", model, [optimizer], extra={"step": 3})
    extra = load_distributed("ckpt/step3", model, [optimizer])

Model keys are the module's fully qualified parameter names (``net.0.0.weight``), optimizer
states are keyed by the same names (DCP's ``get_optimizer_state_dict``), so both survive a change of
layout. Only pass the part of a model this rank holds (e.g. a pipeline stage): keys it lacks are
simply not read.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

META_FILE = "meta.pt"
MODEL_KEY = "model"

__all__ = ["META_FILE", "is_distributed_checkpoint", "load_distributed", "save_distributed"]


def _optim_key(index: int) -> str:
    return f"optimizer_{index}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def save_distributed(
    path: Union[str, os.PathLike],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    extra: Optional[dict[str, Any]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Path:
    """Write ``module`` (and ``optimizers``) to the DCP directory ``path``; every rank must call it.

    ``extra`` (plain picklable data, e.g. epoch and loop state) goes to ``path/meta.pt`` from rank 0.
    ``process_group`` is the group that writes (default: the world; ``None`` works without
    ``torch.distributed`` too).
    """
    path = Path(path)
    if path.is_file():
        raise FileExistsError(
            f"checkpoint path {path} is a file; a distributed checkpoint is a directory: remove the file or pick "
            "another path."
        )
    path.mkdir(parents=True, exist_ok=True)
    options = StateDictOptions(full_state_dict=False)
    state: dict[str, Any] = {MODEL_KEY: get_model_state_dict(module, options=options)}
    for i, optimizer in enumerate(optimizers):
        state[_optim_key(i)] = get_optimizer_state_dict(module, optimizer, options=options)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path), process_group=process_group)
    if _rank() == 0:
        meta = dict(extra or {})
        meta["_distnn_optimizers"] = len(optimizers)
        torch.save(meta, path / META_FILE)
    _barrier(process_group)
    return path


def load_distributed(
    path: Union[str, os.PathLike],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    strict: bool = True,
    process_group: Optional[dist.ProcessGroup] = None,
) -> dict[str, Any]:
    """Read the DCP directory ``path`` into ``module`` (and ``optimizers``) at this process's layout.

    The module may be sharded differently from the one saved (another ``tp``), or be a plain module
    on one process without ``torch.distributed``. Returns the ``extra`` dict saved with it.
    ``strict`` fails on keys this module has and the checkpoint lacks.
    """
    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (a directory with DCP's .metadata): pass the directory that "
            "save_distributed / the strategy's save_checkpoint wrote."
        )
    meta_file = path / META_FILE
    meta = torch.load(meta_file, weights_only=False) if meta_file.is_file() else {}
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
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    saved = {key.split(".", 1)[1] for key in metadata.state_dict_metadata if key.startswith(MODEL_KEY + ".")}
    missing = sorted(k for k in state[MODEL_KEY] if k not in saved)
    if missing:
        if not strict:
            for key in missing:
                state[MODEL_KEY].pop(key)
        else:
            raise KeyError(
                f"{path} lacks {len(missing)} tensors of this model (first: {missing[:3]}): it was saved from "
                "another model, or pass strict=False to load the rest."
            )
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), process_group=process_group)
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
