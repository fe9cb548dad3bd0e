"""Lightning strategies of lightning_distnn; importing this module registers their names.

Every class registers its names (and name variants with preset arguments, as Lightning's own
``DDPStrategy.register_strategies`` does) with Lightning's ``StrategyRegistry``:

* ``distnn_dp``, ``distnn_dp_fp16``, ``distnn_dp_bf16``, ``distnn_dp_powersgd``, ``distnn_dp_topk``
* ``distnn_ps``, ``distnn_ps_async``; ``distnn_local_sgd``
* ``distnn_hybrid``, ``distnn_pipeline``, ``distnn_tp``; ``distnn_feature``; ``distnn_auto`` (the planner)
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_distnn.strategies.auto import AutoStrategy
from lightning_distnn.strategies.base import MeshStrategy
from lightning_distnn.strategies.data_parallel import DataParallelBase, DataParallelStrategy, LocalSGDStrategy
from lightning_distnn.strategies.param_server import ParameterServerStrategy
from lightning_distnn.strategies.feature_parallel import FeatureParallelStrategy
from lightning_distnn.strategies.hybrid import HybridStrategy
from lightning_distnn.strategies.pipeline import PipelineStrategy
from lightning_distnn.strategies.tensor_parallel import TensorParallelStrategy

STRATEGIES = [
    DataParallelStrategy,
    ParameterServerStrategy,
    LocalSGDStrategy,
    HybridStrategy,
    PipelineStrategy,
    TensorParallelStrategy,
    FeatureParallelStrategy,
    AutoStrategy,
]

for _strategy in STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)


def registered_names() -> list[str]:
    """Every name lightning_distnn registers (variants included)."""
    return sorted(name for name, entry in StrategyRegistry.items() if name.startswith("distnn_"))


def get_strategy(name: str, **kwargs):
    """Build a lightning_distnn strategy from its registered name; unknown names list the valid ones."""
    if name not in registered_names():
        raise ValueError(
            f"Unknown strategy {name!r}. lightning_distnn registers: {', '.join(registered_names())} "
            "(Lightning's own names such as 'ddp' work too). Pick one, e.g. strategy=dp in Hydra or "
            "Trainer(strategy='distnn_dp')."
        )
    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], **kwargs})


__all__ = [
    "STRATEGIES",
    "AutoStrategy",
    "DataParallelBase",
    "DataParallelStrategy",
    "FeatureParallelStrategy",
    "HybridStrategy",
    "LocalSGDStrategy",
    "MeshStrategy",
    "ParameterServerStrategy",
    "PipelineStrategy",
    "TensorParallelStrategy",
    "get_strategy",
    "registered_names",
]
