"""Tensor parallelism (horizontal model distribution): each rank holds a share of every weight.

Pure torch on ``DeviceMesh``/``DTensor``, by concern:

* :mod:`.collectives`: the differentiable collectives (Megatron's *f*/*g*, all-gather, split).
* :mod:`.styles`: our ``ParallelStyle`` s, :class:`ColwiseConv`, :class:`RowwiseConv` (local
  convolution on the shard, any stride) and :class:`ChannelShardedNorm` (exact per-channel
  statistics); ``nn.Linear`` uses torch's ``ColwiseParallel`` / ``RowwiseParallel``.
* :mod:`.walk`: a network's modules in forward order (``nn.Sequential``, torchvision's ResNet as a
  chain of children, residual blocks with their branch and shortcut).
* :mod:`.rules`: the automatic plan as a table of rules per module kind.
* :mod:`.plan`: :class:`TPPlan` (plain data, prints as a table), :func:`plan_tp`, :func:`apply_tp`.
* :mod:`.accounting`: :func:`comm_bytes`, :func:`sharded_parameter_numel`, :func:`activation_numel`.
* private torch APIs (``__class__`` swap, ``Conv2d._conv_forward``) go through :mod:`lightning_distnn._compat`.

Activation layouts between modules are plain local tensors; the plan records them as
``replicate``, ``shard(1)`` (channels of an NCHW tensor) or ``shard(-1)`` (features).
"""

from lightning_distnn.parallel.tensor.accounting import activation_numel, comm_bytes, sharded_parameter_numel
from lightning_distnn.parallel.tensor.data import REPLICATE, SHARD_CHANNELS, SHARD_FEATURES, STYLES, PlanEntry, TPPlan
from lightning_distnn.parallel.tensor.plan import apply_tp, plan_tp
from lightning_distnn.parallel.tensor.rules import RULES, rules_table
from lightning_distnn.parallel.tensor.styles import ChannelShardedNorm, ColwiseConv, RowwiseConv
from lightning_distnn.parallel.tensor.walk import leaves

#: Deprecated alias of :func:`leaves` (the TP strategy imports it); use ``leaves``.
_leaves = leaves

__all__ = [
    "REPLICATE",
    "RULES",
    "SHARD_CHANNELS",
    "SHARD_FEATURES",
    "STYLES",
    "ChannelShardedNorm",
    "ColwiseConv",
    "PlanEntry",
    "RowwiseConv",
    "TPPlan",
    "activation_numel",
    "apply_tp",
    "comm_bytes",
    "leaves",
    "plan_tp",
    "rules_table",
    "sharded_parameter_numel",
]
