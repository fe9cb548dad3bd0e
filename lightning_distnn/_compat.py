"""The one place for unavoidable private torch / Lightning imports (version differences live here)."""

# feature parallel (strategies/feature_parallel.py): move optimizer state to the device, as DDPStrategy.setup does
from lightning.fabric.utilities.optimizer import _optimizers_to_device  # noqa: E402,F401

# model sync (strategies/data_parallel.py): broadcast rank 0's parameters when the model is not DDP-wrapped
from lightning.pytorch.overrides.distributed import _sync_module_states  # noqa: E402,F401
