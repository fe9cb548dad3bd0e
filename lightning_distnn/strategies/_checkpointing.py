"""Layout-independent Lightning checkpoints for our strategies (torch.distributed.checkpoint).

Mixed into a strategy, :class:`DistributedCheckpointMixin` makes ``trainer.save_checkpoint`` /
``ModelCheckpoint`` write a DCP directory (:func:`lightning_distnn.checkpoint.save_distributed`:
the model and optimizer states keyed by the unsplit model's parameter names, Lightning's loop state
in ``meta.pt``) and ``trainer.fit(ckpt_path=...)`` read one written under any layout. A regular
Lightning checkpoint file still loads as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning_distnn.checkpoint import is_distributed_checkpoint, load_distributed, save_distributed


class DistributedCheckpointMixin:
    """Save and load DCP directories from a Lightning strategy (put it first among the bases)."""

    _loaded_distributed = False

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # the module is split/sharded and the optimizers exist only after setup: DCP reads into those
        return True

    def _raw_optimizers(self) -> list:
        return [getattr(o, "_optimizer", o) for o in self.optimizers]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint writes DCP directories and takes no storage_options.")
        path = Path(self.broadcast(str(filepath)))
        extra = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        save_distributed(path, self.lightning_module, self._raw_optimizers(), extra=extra)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            import shutil

            path = Path(filepath)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_distributed_checkpoint(path):
            self._loaded_distributed = False
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._loaded_distributed = True
        checkpoint = load_distributed(
            path, self.lightning_module, self._raw_optimizers(), strict=self.lightning_module.strict_loading
        )
        # already restored into the module and optimizers; the keys tell Lightning they were in the checkpoint
        checkpoint.setdefault("optimizer_states", [{} for _ in self.optimizers])
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if not self._loaded_distributed:  # already read into the module by load_checkpoint
            super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not self._loaded_distributed:
            super().load_optimizer_state_dict(checkpoint)
