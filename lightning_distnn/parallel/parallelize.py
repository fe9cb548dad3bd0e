"""The composer: one call turns a network and a layout into this rank's part of it.

Pure torch, no Lightning. :func:`parallelize` applies the three kinds of parallelism in one fixed
order (torchtitan's ``parallelize_*`` functions and its pipeline split follow the same order):

1. **pipeline cut** (``pp`` axis): the :class:`~lightning_distnn.partition.model.StagePlan` names the
   layers of every stage; this rank keeps the stages the schedule places on it;
2. **tensor parallel** (``tp`` axis): each local stage (the whole network when ``pp == 1``) is
   sharded by :func:`~lightning_distnn.parallel.tensor.apply_tp`, so every stage boundary carries a
   whole (replicated) activation and the pipeline's point-to-point messages stay plain tensors;
3. **pipeline schedule** over the ``pp`` group (:func:`~lightning_distnn.parallel.pipeline.apply_pipeline`);
4. **data-parallel gradient sync** (``dp`` axis): :func:`apply_dp` returns the one
   :class:`GradientSync` that averages this rank's gradients over its replicas, after the backward
   (fp32, or fp16/bf16 on the wire).

The result, a :class:`ParallelNet`, holds the local modules (whose parameters the optimizer
trains), the pipeline runtime (or ``None`` at ``pp == 1``, where the network runs as an ordinary
module), the tensor-parallel plans and the gradient sync. The data-parallel *strategies*
(all-reduce, parameter server, local SGD) keep whole replicas and use DDP's reducer and comm hooks
instead (:mod:`lightning_distnn.strategies.data_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_distnn.mesh import Axis, ParallelDims
from lightning_distnn.parallel.collectives import broadcast_replicas_, flat_average_
from lightning_distnn.parallel.pipeline import Pipeline, apply_pipeline
from lightning_distnn.parallel.tensor import REPLICATE, TPPlan, apply_tp, comm_bytes, leaves
from lightning_distnn.partition.model import StagePlan

#: wire dtypes of the data-parallel all-reduce ("compression" on the hybrid's dp axis)
DP_WIRE_DTYPES: dict[Optional[str], Optional[torch.dtype]] = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


class GradientSync:
    """Averages the gradients of ``modules`` over the data-parallel ``group`` (one flat all-reduce).

    Tensor-parallel (DTensor) gradients are averaged through their local shards: the dp peers of a
    rank hold the same shard. ``wire_dtype`` (``torch.float16``/``torch.bfloat16``) sends the buffer
    in half precision. ``payload_bytes`` is the size of the last all-reduced buffer.
    """

    def __init__(self, modules: list[nn.Module], *, group: dist.ProcessGroup, wire_dtype: Optional[torch.dtype] = None) -> None:
        self.modules = modules
        self.group = group
        self.wire_dtype = wire_dtype
        self.size = dist.get_world_size(group)
        self.payload_bytes = 0

    def __call__(self) -> None:
        grads = [p.grad for m in self.modules for p in m.parameters() if p.grad is not None]
        self.payload_bytes = flat_average_(grads, group=self.group, wire_dtype=self.wire_dtype)

    def bytes_per_step(self) -> int:
        """Ring all-reduce bytes this rank sends per step: ``2 (n-1)/n`` x the payload."""
        return int(round(2 * (self.size - 1) / self.size * self.payload_bytes))


def apply_dp(modules: list[nn.Module], *, group: Optional[dist.ProcessGroup], compression: Optional[str] = None) -> Optional[GradientSync]:
    """The gradient sync of this rank's ``modules`` over ``group``; ``None`` when there is one replica."""
    if compression not in DP_WIRE_DTYPES:
        raise ValueError(f"Unknown data-parallel compression={compression!r}; valid: None, 'fp16', 'bf16'.")
    if group is None or dist.get_world_size(group) == 1:
        return None
    return GradientSync(modules, group=group, wire_dtype=DP_WIRE_DTYPES[compression])


@dataclass
class ParallelNet:
    """This rank's part of a parallelized network (what :func:`parallelize` returns)."""

    dims: ParallelDims
    modules: list[nn.Module]
    pipeline: Optional[Pipeline] = None
    grad_sync: Optional[GradientSync] = None
    tp_plans: list[TPPlan] = field(default_factory=list)
    stage_plan: Optional[StagePlan] = None
    _tp_numel: dict = field(default_factory=dict, repr=False)
    _hooks: list = field(default_factory=list, repr=False)

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules:
            yield from module.parameters()

    def named_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """This rank's layers under their names in the unsplit network."""
        for module in self.modules:
            yield from module.named_children()

    # ---- accounting ---------------------------------------------------------------------------
    def watch_tp_traffic(self) -> None:
        """Forward hooks that note the global activation sizes of the sharded layers of the last
        training forward (what :meth:`comm_bytes_per_step` counts tensor-parallel traffic from)."""
        tp = self.dims.tp
        for index, (plan, module) in enumerate(zip(self.tp_plans, self.modules)):
            sharded = {e.name: e for e in plan.entries if e.style in ("colwise", "rowwise")}

            def record(entry, key):
                def hook(layer, inputs, output):
                    if layer.training:
                        local_out = output.to_local() if isinstance(output, DTensor) else output
                        n_in = inputs[0].numel() * (1 if entry.input == REPLICATE else tp)
                        n_out = local_out.numel() * (1 if entry.output == REPLICATE else tp)
                        self._tp_numel[key] = (n_in, n_out)

                return hook

            for name, layer in leaves(module):
                if name in sharded:
                    self._hooks.append(layer.register_forward_hook(record(sharded[name], (index, name))))

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends and receives per optimizer step, by kind: pipeline activations and
        their gradients (``sent``/``received``: activation shapes x micro-batches), tensor-parallel
        collectives (``tp``, analytic from the last training forward's shapes, ring algorithms; included
        in ``sent``/``received``), and the data-parallel gradient all-reduce (``allreduce``, ring:
        ``2 (dp-1)/dp`` x the buffer)."""
        out = {"sent": 0, "received": 0}
        if self.pipeline is not None:
            out.update(self.pipeline.comm_bytes_per_step(training=True))
        if self._tp_numel:
            forwards = self.pipeline.microbatches if self.pipeline is not None else 1
            tp_bytes = 0
            for index, plan in enumerate(self.tp_plans):
                numel = {name: n for (i, name), n in self._tp_numel.items() if i == index}
                # a stage after the first receives an activation whose gradient it sends back
                later_stage = self.pipeline is not None and self.pipeline.stage_indices[index] != 0
                tp_bytes += comm_bytes(plan, numel, input_requires_grad=later_stage)["sent"]
            out["tp"] = tp_bytes * forwards
            out["sent"] += out["tp"]
            out["received"] += out["tp"]
        if self.grad_sync is not None:
            out["allreduce"] = self.grad_sync.bytes_per_step()
        return out

    def close(self) -> None:
        """Remove the accounting hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def parallelize(
    net: nn.Sequential,
    dims: ParallelDims,
    *,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    stage_plan: Optional[StagePlan] = None,
    schedule: str = "1f1b",
    microbatches: int = 4,
    tp_plan: Optional[Mapping[str, str]] = None,
    compression: Optional[str] = None,
    record_timeline: bool = True,
) -> ParallelNet:
    """Split, shard and synchronise ``net`` for this rank under ``dims`` (its mesh must be built).

    ``stage_plan`` is required when ``dims.pp > 1`` (``plan.num_stages`` = pp x stages per rank of
    ``schedule``). The returned modules share their parameters with ``net``'s layers (sharded in
    place when ``dims.tp > 1``), so an optimizer over ``ParallelNet.parameters()`` trains them.
    """
    mesh = dims.mesh
    tp_plans: list[TPPlan] = []

    def shard(module: nn.Module) -> nn.Module:
        if dims.tp > 1:
            tp_plans.append(apply_tp(module, mesh[Axis.TP.value], plan=tp_plan))
        return module

    pipeline: Optional[Pipeline] = None
    if dims.pp > 1:
        if stage_plan is None:
            raise ValueError(f"pp={dims.pp} needs a stage plan: pass stage_plan= (lightning_distnn.partition.model.make_plan).")
        pipeline = apply_pipeline(
            net,
            stage_plan,
            group=dims.group(Axis.PP),
            device=device,
            loss_fn=loss_fn,
            schedule=schedule,
            microbatches=microbatches,
            stage_transform=shard,
            record_timeline=record_timeline,
        )
        modules = list(pipeline.modules)
    else:
        modules = [shard(net.to(device))]
    for module in modules:  # replicas start equal, seeded or not: over tp (plain tensors), then over dp
        broadcast_replicas_(module, group=dims.group(Axis.TP) if dims.tp > 1 else None, plain_only=True)
        broadcast_replicas_(module, group=dims.group(Axis.DP) if dims.dp > 1 else None)
    grad_sync = apply_dp(modules, group=dims.group(Axis.DP) if dims.dp > 1 else None, compression=compression)
    out = ParallelNet(dims=dims, modules=modules, pipeline=pipeline, grad_sync=grad_sync, tp_plans=tp_plans, stage_plan=stage_plan)
    if tp_plans:
        out.watch_tp_traffic()
    return out
