"""The one place for unavoidable private torch / Lightning imports (version differences live here)."""

# feature parallel (strategies/feature_parallel.py): move optimizer state to the device, as DDPStrategy.setup does
from lightning.fabric.utilities.optimizer import _optimizers_to_device  # noqa: E402,F401

# model sync (strategies/data_parallel.py): broadcast rank 0's parameters when the model is not DDP-wrapped
from lightning.pytorch.overrides.distributed import _sync_module_states  # noqa: E402,F401


def skip_per_batch_sigterm_broadcast(trainer) -> None:
    """Asynchronous parameter server: Lightning's training loop broadcasts a SIGTERM flag from rank 0
    before every batch, which locks all ranks into step. Turn that off for this trainer's fit loop
    (a private method, overridden on the instance only). Cost: a SIGTERM on one rank is not
    forwarded to the others; the parameter server then ends the job on the dead peer instead."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
