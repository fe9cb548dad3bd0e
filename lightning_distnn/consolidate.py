"""One Lightning checkpoint file from a distributed checkpoint directory, and ``distnn-checkpoint``.

The lightning_distnn strategies save DCP directories (``lightning_distnn.checkpoint``): any layout
resumes from them, but Lightning's own readers (``LightningModule.load_from_checkpoint``, a
``Trainer`` with a Lightning strategy, ``torch.load``) expect one file. :func:`to_lightning_checkpoint`
writes that file:

- with the run's ``module`` (an unsplit instance of the LightningModule): the whole state, in
  Lightning's format: weights, optimizer states indexed as the module's own ``configure_optimizers``
  orders its parameters, LR schedulers, loops and callbacks. ``Trainer(devices=1).fit(model,
  ckpt_path=file)`` (or Lightning's DDP) continues exactly where the distributed run stopped.
- without it: the weights, hyper-parameters and loop state, as Lightning's
  ``ModelCheckpoint(save_weights_only=True)`` writes them: enough for ``load_from_checkpoint``,
  inference and fine-tuning, not to resume the optimizer.

``distnn-checkpoint consolidate PATH`` does the same from the shell; under a ``distnn-train`` run
directory it builds the module from the run's own Hydra config, so the file is whole.
``distnn-checkpoint list DIR`` shows every checkpoint under a directory: step, layout, and why one
cannot be resumed from.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lightning_distnn.checkpoint import (
    MODEL_KEY,
    META_FILE,
    CheckpointError,
    _manifest,
    _quiet_single_process,
    _read_metadata,
    check_checkpoint,
    is_distributed_checkpoint,
    load_distributed,
    scan_checkpoints,
)

__all__ = ["configured_optimizers", "default_output", "main", "to_lightning_checkpoint"]

# read on this process alone, also inside a distributed job (torch >= 2.6; older torch decides by itself)
_NO_DIST = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
# what Lightning's ModelCheckpoint(save_weights_only=True) leaves out
_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks")


def configured_optimizers(module: nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers ``module.configure_optimizers()`` returns, in any of Lightning's forms.

    (One optimizer; a list or tuple of them; ``(optimizers, schedulers)``; a dict with
    ``"optimizer"``; a list of such dicts.)
    """

    def found(conf) -> list:
        if isinstance(conf, torch.optim.Optimizer):
            return [conf]
        if isinstance(conf, dict):
            return found(conf.get("optimizer"))
        if isinstance(conf, (list, tuple)):
            return [o for item in conf for o in found(item)]
        return []

    return found(module.configure_optimizers())


def default_output(path: Union[str, os.PathLike]) -> Path:
    """``ckpts/last.ckpt`` (a directory) -> ``ckpts/last.consolidated.ckpt`` (a file)."""
    path = Path(path)
    stem = path.name[: -len(".ckpt")] if path.name.endswith(".ckpt") else path.name
    return path.with_name(f"{stem}.consolidated.ckpt")


def _check_readable(path: Path, verify: bool) -> None:
    if path.is_file():
        raise ValueError(
            f"{path} is already a single-file checkpoint: LightningModule.load_from_checkpoint and "
            "Trainer.fit(ckpt_path=...) read it as it is."
        )
    if not is_distributed_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a distributed checkpoint (a directory with DCP's .metadata): pass a checkpoint "
            "directory that a lightning_distnn strategy saved (e.g. <run>/csv/checkpoints/last.ckpt); "
            "`distnn-checkpoint list DIR` lists those under DIR."
        )
    problems = check_checkpoint(path, verify=verify) if (path / "manifest.json").is_file() else []
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be read: {'; '.join(problems)}. Use another checkpoint.")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint, whole (any layout), read on this process alone."""
    state = {}
    for key, md in _read_metadata(path).state_dict_metadata.items():
        if key.startswith(MODEL_KEY + ".") and hasattr(md, "size"):
            state[key[len(MODEL_KEY) + 1:]] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    with _quiet_single_process():
        dcp.load({MODEL_KEY: state}, checkpoint_id=str(path), **_NO_DIST)
    return state


def to_lightning_checkpoint(
    path: Union[str, os.PathLike],
    out: Union[str, os.PathLike, None] = None,
    module: Optional[nn.Module] = None,
    optimizers: Optional[Sequence[torch.optim.Optimizer]] = None,
    *,
    verify: bool = True,
) -> Path:
    """Write the DCP checkpoint directory ``path`` as one Lightning checkpoint file; returns its path.

    Args:
        path: a directory saved by a lightning_distnn strategy (``trainer.save_checkpoint``,
            ``ModelCheckpoint``, ``ElasticCheckpoint``) under any layout.
        out: the file to write (default :func:`default_output`: ``last.ckpt`` -> ``last.consolidated.ckpt``).
        module: an unsplit instance of the run's LightningModule (its weights are overwritten). With it
            the file holds the optimizer and scheduler state too, so one process or any Lightning
            strategy resumes from it; without it, weights only.
        optimizers: the module's optimizers (default: what ``module.configure_optimizers()`` returns).
        verify: check the files' CRC32 against the manifest first.

    Runs on one process, without ``torch.distributed``; holds the whole model in memory.
    """
    path = Path(path)
    _check_readable(path, verify)
    out = default_output(path) if out is None else Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory: pass the path of the file to write (e.g. {default_output(path)}).")
    if module is None:
        meta_file = path / META_FILE
        checkpoint = torch.load(meta_file, weights_only=False) if meta_file.is_file() else {}
        for key in (*_TRAINING_STATE, "_distnn_optimizers"):
            checkpoint.pop(key, None)
        checkpoint["state_dict"] = _weights(path)
    else:
        configure_model = getattr(module, "configure_model", None)
        if callable(configure_model):  # a LightningModule that builds its layers there (the hook is idempotent)
            configure_model()
        if optimizers is None:
            meta_file = path / META_FILE
            saved = torch.load(meta_file, weights_only=False).get("_distnn_optimizers", 0) if meta_file.is_file() else 0
            try:
                optimizers = configured_optimizers(module) if saved else []
            except Exception as exc:  # noqa: BLE001 - e.g. a configure_optimizers that reads self.trainer
                raise RuntimeError(
                    f"{type(module).__name__}.configure_optimizers() failed outside a Trainer ({type(exc).__name__}: "
                    f"{exc}): build the optimizers yourself and pass them as optimizers=[...], or pass no module "
                    "to write the weights only."
                ) from exc
        checkpoint = load_distributed(path, module, list(optimizers), verify=False)
        checkpoint.pop("_distnn_optimizers", None)
        checkpoint["state_dict"] = module.state_dict()
        if optimizers:
            checkpoint["optimizer_states"] = [o.state_dict() for o in optimizers]
            checkpoint.setdefault("lr_schedulers", [])
        else:  # saved without optimizer state: a weights-only file, which Lightning refuses to resume from
            for key in _TRAINING_STATE:
                checkpoint.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


# ---- distnn-checkpoint ---------------------------------------------------------------------------


def _run_module(path: Path, run: Optional[str] = None) -> tuple[Optional[nn.Module], Optional[Path]]:
    """The LightningModule of a ``distnn-train`` run, from its ``.hydra/config.yaml``: that of ``run`` (a run
    directory or the file), else the first found above ``path``."""
    if run is not None:
        config = Path(run)
        config = config / ".hydra" / "config.yaml" if config.is_dir() else config
        if not config.is_file():
            raise FileNotFoundError(f"--run {run} is neither a distnn-train run directory (with .hydra/config.yaml) nor "
                                    "that config file.")
        candidates = [config]
    else:
        candidates = [parent / ".hydra" / "config.yaml" for parent in path.resolve().parents]
    for config in candidates:
        if config.is_file():
            import hydra
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)
            if "model" not in cfg:
                return None, None
            return hydra.utils.instantiate(cfg.model), config
    return None, None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distnn-checkpoint",
        description="Inspect distributed checkpoints and turn one into a single Lightning checkpoint file.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser(
        "consolidate",
        help="write a checkpoint directory as one Lightning .ckpt file",
        description="Write a DCP checkpoint directory (any layout) as one Lightning checkpoint file. Under a "
        "distnn-train run directory the run's Hydra config builds the model, so the file keeps the optimizer "
        "state and resumes; elsewhere it holds the weights (LightningModule.load_from_checkpoint reads them).",
    )
    cons.add_argument("path", help="the checkpoint directory, e.g. outputs/<date>/<time>/csv/checkpoints/last.ckpt")
    cons.add_argument("-o", "--out", help="the file to write (default: <name>.consolidated.ckpt beside it)")
    cons.add_argument("--run", help="the distnn-train run directory whose config builds the model (default: the "
                      "one above PATH; elastic checkpoints sit in the launch directory, outside it)")
    cons.add_argument("--weights-only", action="store_true", help="do not build the run's model: weights only")
    cons.add_argument("--no-verify", action="store_true", help="skip the CRC32 check of the files")
    lst = sub.add_parser("list", help="every checkpoint under a directory: step, layout, complete or why not")
    lst.add_argument("directory")
    lst.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _list(directory: Path, as_json: bool) -> int:
    statuses = scan_checkpoints(directory)
    rows = []
    for s in statuses:
        layout = ""
        if s.complete:
            try:
                layout = _manifest(s.path).get("layout") or ""
            except CheckpointError:
                pass
        rows.append({"path": str(s.path), "step": s.step, "layout": layout, "complete": s.complete, "problem": s.problem})
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no distributed checkpoints under {directory}")
        return 0
    for r in rows:
        state = f"step {r['step']}" if r["complete"] else f"NOT RESUMABLE: {r['problem']}"
        print(f"{r['path']}  {state}" + (f"  [{r['layout']}]" if r["layout"] else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``distnn-checkpoint consolidate PATH [-o FILE] [--run DIR] [--weights-only]`` or ``distnn-checkpoint list DIR``."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _list(Path(args.directory), args.json)
    path = Path(args.path)
    module = config = None
    try:
        _check_readable(path, verify=not args.no_verify)
        if not args.weights_only:
            module, config = _run_module(path, args.run)
        out = to_lightning_checkpoint(path, args.out, module, verify=False)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"distnn-checkpoint: {exc}", file=sys.stderr)
        return 2
    # what was written, from the directory's small files (not by reading the whole model back)
    meta = torch.load(path / META_FILE, weights_only=False) if (path / META_FILE).is_file() else {}
    sizes = [md.size for key, md in _read_metadata(path).state_dict_metadata.items()
             if key.startswith(MODEL_KEY + ".") and hasattr(md, "size")]
    print(f"wrote {out}: {len(sizes)} tensors ({sum(math.prod(s) for s in sizes):,} numbers), "
          f"epoch {meta.get('epoch')}, step {meta.get('global_step')}")
    optimizers = meta.get("_distnn_optimizers", 0)
    if module is not None and optimizers:
        print(f"model built from {config}: optimizer state included ({optimizers} optimizer(s)); "
              "Trainer(...).fit(model, ckpt_path=...) resumes from it on one process, under "
              "Lightning's strategies or distnn_dp.")
    elif module is not None:
        print("weights only (the checkpoint holds no optimizer state): YourModule.load_from_checkpoint(...) reads it.")
    else:
        why = "--weights-only" if args.weights_only else "no distnn-train run config (.hydra/config.yaml) above it"
        print(f"weights only ({why}): YourModule.load_from_checkpoint(...) reads it. To resume training from it, "
              "pass --run <the distnn-train run directory>, or call lightning_distnn.consolidate."
              "to_lightning_checkpoint(path, module=YourModule(...)) in Python.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
