"""Lightning strategies of lightning_distnn; importing this module registers their names."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_distnn.strategies._common import register_strategy

from lightning_distnn.strategies.data_parallel import DataParallelStrategy, LocalSGDStrategy, ParameterServerStrategy
from lightning_distnn.strategies.pipeline import PipelineStrategy
from lightning_distnn.strategies.feature_parallel import FeatureParallelStrategy
from lightning_distnn.strategies.tensor_parallel import TensorParallelStrategy
from lightning_distnn.strategies.hybrid import HybridStrategy

STRATEGIES = [DataParallelStrategy, TensorParallelStrategy, FeatureParallelStrategy, PipelineStrategy, ParameterServerStrategy, LocalSGDStrategy, HybridStrategy]

DESCRIPTIONS = {
    DataParallelStrategy: "lightning_distnn data parallel: DDP all-reduce, optional compression",
    ParameterServerStrategy: "lightning_distnn data parallel through parameter servers (point-to-point)",
    LocalSGDStrategy: "lightning_distnn data parallel with periodic model averaging (local SGD)",
    FeatureParallelStrategy: "lightning_distnn feature parallel: a bottom network per feature slice, all-gathered to a top",
    PipelineStrategy: "lightning_distnn pipeline parallel: torch.distributed.pipelining schedules over the pp axis",
    TensorParallelStrategy: "lightning_distnn tensor parallel: Conv2d/Linear sharded over the tp axis (DTensor)",
    HybridStrategy: "lightning_distnn hybrid: dp x pp x tp on one DeviceMesh",
}

for _strategy in STRATEGIES:
    register_strategy(_strategy, StrategyRegistry, DESCRIPTIONS[_strategy])



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
