"""Lightning strategies of lightning_distnn; importing this module registers their names."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_distnn.strategies.data_parallel import DataParallelStrategy, LocalSGDStrategy, ParameterServerStrategy
from lightning_distnn.strategies.pipeline import PipelineStrategy
from lightning_distnn.strategies.feature_parallel import FeatureParallelStrategy
from lightning_distnn.strategies.tensor_parallel import TensorParallelStrategy
from lightning_distnn.strategies.hybrid import HybridStrategy

STRATEGIES = [DataParallelStrategy, TensorParallelStrategy, FeatureParallelStrategy, PipelineStrategy, ParameterServerStrategy, LocalSGDStrategy, HybridStrategy]

for _strategy in STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)



def registered_names() -> list[str]:
    return sorted(s.strategy_name for s in STRATEGIES)


def get_strategy(name: str, **kwargs):
    """Build a lightning_distnn strategy from its registered name; unknown names list the valid ones."""
    by_name = {s.strategy_name: s for s in STRATEGIES}
    if name not in by_name:
        raise ValueError(
            f"Unknown strategy {name!r}. lightning_distnn registers: {', '.join(registered_names())} "
            "(Lightning's own names such as 'ddp' work too). Pick one, e.g. strategy=dp in Hydra or "
            "Trainer(strategy='distnn_dp')."
        )
    return by_name[name](**kwargs)


__all__ = ["PipelineStrategy", "FeatureParallelStrategy", "DataParallelStrategy", "TensorParallelStrategy", "STRATEGIES", "get_strategy", "registered_names", "ParameterServerStrategy", "LocalSGDStrategy", "HybridStrategy"]
