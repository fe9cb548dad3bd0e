"""The one place for unavoidable private torch / Lightning imports (version differences live here)."""

# feature parallel (strategies/feature_parallel.py): move optimizer state to the device, as DDPStrategy.setup does
from lightning.fabric.utilities.optimizer import _optimizers_to_device  # noqa: E402,F401
