"""The planner: profile a network, predict every layout with the seed's cost model, pick the fastest that fits.

The seed writes a distributed run's time as sums of its parts' times (T = sum T_i for computing,
S = sum S_i for synchronising); :mod:`~lightning_distnn.planner.cost` is that model, fed by a
measured :mod:`~lightning_distnn.planner.profile` and :mod:`~lightning_distnn.planner.links`, and
:mod:`~lightning_distnn.planner.search` ranks every ``dp x pp x tp`` layout with it::

    from lightning_distnn.planner import plan_layout
    plan = plan_layout(net, torch.randn(1, 3, 32, 32), world_size=10, global_batch=40,
                       max_memory_per_rank=2e9)
    print(plan)                      # ranked table + the winner's T_i / S_i / M_i
    strategy = plan.strategy().build()   # e.g. HybridStrategy(dp=2, pp=5, ...)

Command line: ``distnn-plan --help`` (:mod:`lightning_distnn.planner.cli`).
"""

from lightning_distnn.planner.cost import Calibration, Estimate, Layout, Term, check_layout, predict
from lightning_distnn.planner.links import Link, Network, fit_link, measure_link, measure_network
from lightning_distnn.planner.plan import plan_layout, probe
from lightning_distnn.planner.profile import LayerProfile, Leaf, ModelProfile, TPCost, profile_model
from lightning_distnn.planner.search import NoLayoutFits, Plan, StrategyChoice, candidate_layouts, search, strategy_for

__all__ = [
    "Calibration", "Estimate", "Layout", "Term", "check_layout", "predict",
    "Link", "Network", "fit_link", "measure_link", "measure_network",
    "plan_layout", "probe",
    "LayerProfile", "Leaf", "ModelProfile", "TPCost", "profile_model",
    "NoLayoutFits", "Plan", "StrategyChoice", "candidate_layouts", "search", "strategy_for",
]
