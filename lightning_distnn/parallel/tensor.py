"""Tensor parallelism (horizontal model distribution): each rank holds a share of every weight.

Pure torch on ``DeviceMesh``/``DTensor``. The pieces:

* :class:`ColwiseConv` / :class:`RowwiseConv`: our own ``ParallelStyle`` for ``nn.Conv2d``. The weight
  becomes a ``DTensor`` sharded on output channels (``Shard(0)``) or input channels (``Shard(1)``);
  the forward runs the *local* convolution on the local shard and the collectives are explicit
  (Megatron's *f*/*g* pair). DTensor's own ``conv2d`` is never called on a sharded weight: it
  silently mis-shards a weight split on output channels.
* :class:`ChannelShardedNorm`: batch norm on a channel-sharded activation (per-channel, no traffic).
* ``nn.Linear`` uses torch's ``ColwiseParallel`` / ``RowwiseParallel``.
* :func:`plan_tp`: the automatic plan for sequential CNNs and MLPs, a :class:`TPPlan` (plain data, prints
  as a table). Conv2d and Linear layers alternate column-wise (output sharded) and row-wise (input
  sharded, one all-reduce per pair). Element-wise activations, pooling, per-channel norms and
  ``Flatten`` run on the shard; a ``Flatten`` of a channel-sharded ``(N, C, H, W)`` activation is a
  contiguous block of the flattened features (channel is the outermost flattened dim), so the
  following Linear is row-wise with an input that is already sharded.
* :func:`apply_tp`: plans (or takes a user plan of module name -> style name) and shards in place.

Activation layouts between modules are plain local tensors; the plan records them as
``replicate``, ``shard(1)`` (channels of an NCHW tensor) or ``shard(-1)`` (features).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import Placement

__all__ = [
    "STYLES",
    "ChannelShardedNorm",
    "ColwiseConv",
    "PlanEntry",
    "RowwiseConv",
    "TPPlan",
    "apply_tp",
    "comm_bytes",
    "plan_tp",
    "sharded_parameter_numel",
]

#: Style names a user plan may use.
STYLES = ("colwise", "rowwise", "replicate", "sharded_norm", "pass")

REPLICATE, SHARD_CHANNELS, SHARD_FEATURES = "replicate", "shard(1)", "shard(-1)"

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)
_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------
# differentiable collectives over the tensor-parallel group (explicit: these ARE the traffic)
# --------------------------------------------------------------------------------------------
class _AllReduceInBackward(torch.autograd.Function):
    """Megatron's *f*: identity forward; the input gradient (partial per rank) is summed backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceInForward(torch.autograd.Function):
    """Megatron's *g*: partial sums all-reduced forward; the replicated gradient passes backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherInForward(torch.autograd.Function):
    """All-gather shards along ``dim`` forward; each rank keeps its chunk of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[dist.get_rank(ctx.group)].contiguous(), None, None


class _SplitInForward(torch.autograd.Function):
    """Keep this rank's chunk of a replicated tensor forward; gather the gradient chunks backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        size = dist.get_world_size(group)
        return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=ctx.dim), None, None


def _local_input(x, mesh: DeviceMesh, given: Placement, wanted: Placement) -> torch.Tensor:
    """The local tensor of ``x`` in layout ``wanted``; a plain ``x`` is read as layout ``given``."""
    if isinstance(x, DTensor):
        if tuple(x.placements) != (wanted,):
            x = x.redistribute(mesh, [wanted])
        return x.to_local()
    if given == wanted:
        return x
    group = mesh.get_group()
    if isinstance(given, Shard) and isinstance(wanted, Replicate):
        return _GatherInForward.apply(x, group, given.dim)
    if isinstance(given, Replicate) and isinstance(wanted, Shard):
        return _SplitInForward.apply(x, group, wanted.dim)
    raise ValueError(f"cannot convert a plain activation from {given} to {wanted}.")


def _mark(out: torch.Tensor, mesh: DeviceMesh, placement: Placement, use_local_output: bool):
    return out if use_local_output else DTensor.from_local(out, mesh, [placement], run_check=False)


def _as_dtensor_param(param: Optional[nn.Parameter], mesh: DeviceMesh, placement: Placement, src_data_rank):
    if param is None:
        return None
    return nn.Parameter(
        distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank),
        requires_grad=param.requires_grad,
    )


_SWAPPED: dict[tuple[type, str], type] = {}


def _swap_class(module: nn.Module, tag: str, forward) -> None:
    """Give ``module`` a subclass whose forward is ``forward`` (as FSDP2 does); repr and isinstance survive."""
    base = type(module)
    key = (base, tag)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{tag}{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    module.__class__ = _SWAPPED[key]


def _check_conv(module: nn.Module, style: str) -> None:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{style} shards nn.Conv2d, got {type(module).__name__}: use it on a Conv2d layer.")
    if module.groups != 1:
        raise ValueError(
            f"{style} needs groups=1, got a Conv2d with groups={module.groups}: plan it 'replicate' instead."
        )


# --------------------------------------------------------------------------------------------
# our ParallelStyles
# --------------------------------------------------------------------------------------------
class ColwiseConv(ParallelStyle):
    """Shard a Conv2d on output channels: weight and bias ``Shard(0)``, output sharded on dim 1.

    The input is needed whole (``Replicate``); a channel-sharded input (``input_layouts=Shard(1)``) is
    all-gathered first. Forward has no traffic; backward sums the input gradient over the group
    (each rank's output channels contribute a partial sum). ``output_layouts=Replicate()`` all-gathers
    the output channels (used when a layer that needs the whole activation follows).

    The convolution runs on local tensors (``weight.to_local()``), so the arithmetic of every output
    channel is exactly that of the unsharded layer.
    """

    def __init__(
        self,
        *,
        input_layouts: Optional[Placement] = None,
        output_layouts: Optional[Placement] = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        self.input_layouts = input_layouts or Replicate()
        self.output_layouts = output_layouts or Shard(1)
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_conv(module, "ColwiseConv")
        size = device_mesh.size()
        if module.out_channels % size:
            raise ValueError(
                f"ColwiseConv splits out_channels={module.out_channels} over tp={size} ranks, which does not divide "
                f"it: use a channel count divisible by {size}, another tp, or plan this layer 'replicate'."
            )
        module.weight = _as_dtensor_param(module.weight, device_mesh, Shard(0), self.src_data_rank)
        if module.bias is not None:
            module.bias = _as_dtensor_param(module.bias, device_mesh, Shard(0), self.src_data_rank)
        module._tp_mesh, module._tp_style = device_mesh, self
        _swap_class(module, "Colwise", _colwise_conv_forward)
        return module

    def __repr__(self) -> str:
        return f"ColwiseConv(input_layouts={self.input_layouts}, output_layouts={self.output_layouts})"


def _colwise_conv_forward(self, x):
    style: ColwiseConv = self._tp_style
    mesh: DeviceMesh = self._tp_mesh
    group = mesh.get_group()
    x = _local_input(x, mesh, style.input_layouts, Replicate())
    if torch.is_grad_enabled() and x.requires_grad:
        x = _AllReduceInBackward.apply(x, group)
    bias = self.bias.to_local() if self.bias is not None else None
    out = self._conv_forward(x, self.weight.to_local(), bias)
    if isinstance(style.output_layouts, Replicate):
        out = _GatherInForward.apply(out, group, 1)
    return _mark(out, mesh, style.output_layouts, style.use_local_output)


class RowwiseConv(ParallelStyle):
    """Shard a Conv2d on input channels: weight ``Shard(1)``, input sharded on dim 1, output replicated.

    Each rank convolves its input channels with its weight slice (a partial sum of every output
    channel); one all-reduce adds the partial sums; the bias (``Replicate``) is added once, after it.
    A replicated input (``input_layouts=Replicate()``) is split locally, without traffic.
    """

    def __init__(self, *, input_layouts: Optional[Placement] = None, use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layouts = input_layouts or Shard(1)
        self.output_layouts = Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_conv(module, "RowwiseConv")
        size = device_mesh.size()
        if module.in_channels % size:
            raise ValueError(
                f"RowwiseConv splits in_channels={module.in_channels} over tp={size} ranks, which does not divide "
                f"it: use a channel count divisible by {size}, another tp, or plan this layer 'replicate'."
            )
        module.weight = _as_dtensor_param(module.weight, device_mesh, Shard(1), self.src_data_rank)
        if module.bias is not None:
            module.bias = _as_dtensor_param(module.bias, device_mesh, Replicate(), self.src_data_rank)
        module._tp_mesh, module._tp_style = device_mesh, self
        _swap_class(module, "Rowwise", _rowwise_conv_forward)
        return module

    def __repr__(self) -> str:
        return f"RowwiseConv(input_layouts={self.input_layouts})"


def _rowwise_conv_forward(self, x):
    style: RowwiseConv = self._tp_style
    mesh: DeviceMesh = self._tp_mesh
    x = _local_input(x, mesh, style.input_layouts, Shard(1))
    partial = self._conv_forward(x, self.weight.to_local(), None)
    out = _AllReduceInForward.apply(partial, mesh.get_group())
    if self.bias is not None:
        out = out + self.bias.to_local().view(1, -1, 1, 1)
    return _mark(out, mesh, Replicate(), style.use_local_output)


class ChannelShardedNorm(ParallelStyle):
    """Batch norm (1d/2d) on an activation sharded on dim 1: affine weights and running stats ``Shard(0)``.

    Statistics are per channel, so each rank normalises its own channels with no traffic.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, _CHANNEL_NORMS):
            raise TypeError(f"ChannelShardedNorm shards BatchNorm1d/2d, got {type(module).__name__}.")
        size = device_mesh.size()
        if module.num_features % size:
            raise ValueError(
                f"ChannelShardedNorm splits num_features={module.num_features} over tp={size} ranks, which does not "
                f"divide it: plan this layer 'replicate' or change tp."
            )
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                setattr(module, name, _as_dtensor_param(getattr(module, name), device_mesh, Shard(0), self.src_data_rank))
        for name in ("running_mean", "running_var"):
            buf = getattr(module, name)
            if buf is not None:
                module.register_buffer(name, distribute_tensor(buf, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank))
        module._tp_mesh, module._tp_style = device_mesh, self
        _swap_class(module, "ChannelSharded", _sharded_norm_forward)
        return module


def _sharded_norm_forward(self, x):
    mesh: DeviceMesh = self._tp_mesh
    x = _local_input(x, mesh, Shard(1), Shard(1))
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
    use_batch_stats = self.training or self.running_mean is None
    local = lambda t: None if t is None else t.to_local()  # noqa: E731
    out = F.batch_norm(
        x,
        local(self.running_mean) if not self.training or self.track_running_stats else None,
        local(self.running_var) if not self.training or self.track_running_stats else None,
        local(self.weight),
        local(self.bias),
        use_batch_stats,
        factor,
        self.eps,
    )
    return _mark(out, mesh, Shard(1), self._tp_style.use_local_output)


# --------------------------------------------------------------------------------------------
# the plan: plain data
# --------------------------------------------------------------------------------------------
@dataclass
class PlanEntry:
    """One leaf module: its style and the activation layout before and after it."""

    name: str
    kind: str
    style: str
    input: str
    output: str
    note: str = ""


@dataclass
class TPPlan:
    """A tensor-parallel plan for one ``nn.Sequential`` (module names relative to it)."""

    tp: int
    entries: list[PlanEntry] = field(default_factory=list)

    def styles(self) -> dict[str, str]:
        """Module name -> style name (the form a user plan takes)."""
        return {e.name: e.style for e in self.entries}

    def __str__(self) -> str:
        head = ("module", "kind", "style", "input", "output", "note")
        rows = [head] + [(e.name, e.kind, e.style, e.input, e.output, e.note) for e in self.entries]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = [f"tensor-parallel plan, tp={self.tp}"]
        for j, row in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Modules in execution order: nested ``nn.Sequential`` are walked, anything else is one unit."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_leaves(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]


#: public name of the execution-order walk (strategies use it)
def leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    return _leaves(module, prefix)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


def plan_tp(module: nn.Module, tp: int, *, plan: Optional[Mapping[str, str]] = None) -> TPPlan:
    """The tensor-parallel plan of a sequential CNN/MLP, with the user's choices (``plan``) applied.

    Automatic choices: a Conv2d or Linear whose input is replicated is ``colwise`` (if its output
    channels/features divide by ``tp``, else ``replicate``); one whose input is sharded is
    ``rowwise``. Whenever a module needs the whole activation while it is sharded (a Linear after a
    conv with no Flatten, LayerNorm, an unknown module, the network's output), the layer that
    produced the shard gathers its output instead (``colwise`` with output ``replicate``).

    Args:
        module: an ``nn.Sequential`` (blocks may nest), e.g. the whole network or one pipeline stage.
        tp: tensor-parallel degree.
        plan: module name -> style name (:data:`STYLES`); overrides the automatic choice.
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"tensor parallelism plans an nn.Sequential of blocks, got {type(module).__name__}: pass the network "
            "(e.g. ImageClassifier.net) or a slice of it."
        )
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive integer.")
    leaves = _leaves(module)
    names = {name for name, _ in leaves}
    plan = dict(plan or {})
    all_names = {name for name, _ in module.named_modules() if name}
    for name, style in plan.items():
        if name not in names:
            hint = " (it is inside a module that is planned as one unit)" if name in all_names else ""
            raise ValueError(
                f"plan names module {name!r}, which is not a planned module of this network{hint}; valid names: "
                f"{', '.join(sorted(names))}."
            )
        if style not in STYLES:
            raise ValueError(f"plan[{name!r}]={style!r} is not a style; valid styles: {', '.join(STYLES)}.")

    entries: list[PlanEntry] = []
    state = REPLICATE
    producer: Optional[int] = None  # entry index of the layer that made the current shard

    def gather_before(reason: str) -> None:
        """Make the producer of the current shard gather its output; re-layout what follows it."""
        nonlocal state, producer
        if state == REPLICATE:
            return
        if producer is None:  # pragma: no cover - a shard always has a producer
            raise ValueError(f"internal: sharded activation without producer before {reason}")
        p = entries[producer]
        if p.style != "colwise":
            raise ValueError(
                f"{reason} needs the whole activation, but {p.name!r} ({p.style}) makes it sharded and cannot gather "
                f"it: plan {p.name!r} 'colwise' or 'replicate', or move the module."
            )
        p.output, p.note = REPLICATE, (p.note + "; " if p.note else "") + f"output gathered for {reason}"
        for e in entries[producer + 1 :]:
            if e.style == "sharded_norm":
                e.style, e.note = "replicate", "replicated (input gathered)"
            e.input = e.output = REPLICATE
        state, producer = REPLICATE, None

    for idx, (name, child) in enumerate(leaves):
        kind = type(child).__name__
        user = plan.get(name)
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            conv = isinstance(child, nn.Conv2d)
            shard = SHARD_CHANNELS if conv else SHARD_FEATURES
            if conv and state == SHARD_FEATURES or not conv and state == SHARD_CHANNELS:
                gather_before(f"{name!r} ({kind})")
            out_size = child.out_channels if conv else child.out_features
            in_size = child.in_channels if conv else child.in_features
            shardable = not (conv and child.groups != 1)
            if user is None:
                if not shardable:
                    style = "replicate"
                elif state == REPLICATE:
                    # a column-wise layer needs a row-wise partner after it, else its output must be gathered
                    later = any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in leaves[idx + 1 :])
                    style = "colwise" if out_size % tp == 0 and later else "replicate"
                else:
                    style = "rowwise"
            else:
                style = user
                if style not in ("colwise", "rowwise", "replicate"):
                    raise ValueError(
                        f"plan[{name!r}]={style!r} does not apply to {kind}; use colwise, rowwise or replicate."
                    )
                if style != "replicate" and not shardable:
                    raise ValueError(f"plan[{name!r}]={style!r}: a Conv2d with groups={child.groups} cannot be "
                                     "sharded; plan it 'replicate'.")
                need = out_size if style == "colwise" else in_size
                if style != "replicate" and need % tp:
                    what = ("out_" if style == "colwise" else "in_") + ("channels" if conv else "features")
                    raise ValueError(
                        f"plan[{name!r}]={style!r} splits {what}={need} over tp={tp}, which does not divide it: "
                        f"plan it 'replicate' or pick tp dividing {need}."
                    )
            if style == "replicate":
                gather_before(f"{name!r} (replicate)")
                entries.append(PlanEntry(name, kind, style, REPLICATE, REPLICATE, "not sharded"))
                continue
            if style == "rowwise" and state == SHARD_CHANNELS and not conv:  # pragma: no cover
                gather_before(name)
            note = ""
            if style == "colwise" and state != REPLICATE:
                note = "input gathered (all-gather)"
            if style == "rowwise" and state == REPLICATE:
                note = "input split locally"
            entries.append(PlanEntry(name, kind, style, state, shard if style == "colwise" else REPLICATE, note))
            if style == "colwise":
                state, producer = shard, len(entries) - 1
            else:
                state, producer = REPLICATE, None
            continue

        if user is not None and user not in ("replicate", "pass", "sharded_norm"):
            raise ValueError(f"plan[{name!r}]={user!r} does not apply to {kind}; use pass, replicate or sharded_norm.")
        if isinstance(child, _ELEMENTWISE) or (isinstance(child, _POOLS) and state != SHARD_FEATURES):
            entries.append(PlanEntry(name, kind, "pass", state, state, "runs on the shard" if state != REPLICATE else ""))
            continue
        if isinstance(child, _DROPOUTS):
            if child.p > 0 and state == REPLICATE and idx > 0 and tp > 1:
                raise ValueError(
                    f"{name!r} ({kind}, p={child.p}) acts on a replicated activation: each rank would drop different "
                    "elements of what must stay identical. Move it right after a column-wise layer (a sharded "
                    "activation), or set p=0."
                )
            entries.append(PlanEntry(name, kind, "pass", state, state, "runs on the shard" if state != REPLICATE else ""))
            continue
        if isinstance(child, nn.Flatten):
            if state == SHARD_CHANNELS and child.start_dim == 1 and child.end_dim == -1:
                entries.append(PlanEntry(name, kind, "pass", state, SHARD_FEATURES,
                                         "channel shard = contiguous feature block"))
                state = SHARD_FEATURES
                continue
            gather_before(f"{name!r} (Flatten(start_dim={child.start_dim}, end_dim={child.end_dim}))")
            entries.append(PlanEntry(name, kind, "pass", state, state))
            continue
        if isinstance(child, _CHANNEL_NORMS):
            want = user or ("sharded_norm" if state != REPLICATE else "replicate")
            if want == "sharded_norm":
                if state == REPLICATE:
                    raise ValueError(
                        f"plan[{name!r}]='sharded_norm' needs a channel-sharded input, but its input is replicated: "
                        "plan the layer before it 'colwise' or this one 'replicate'."
                    )
                if child.num_features % tp:
                    gather_before(f"{name!r} (num_features={child.num_features} not divisible by tp={tp})")
                    want = "replicate"
            else:
                gather_before(f"{name!r} (replicate)")
            entries.append(PlanEntry(name, kind, want, state, state,
                                     "per-channel statistics on the shard" if want == "sharded_norm" else ""))
            continue
        # LayerNorm, GroupNorm, anything unknown: it sees the whole activation, parameters replicated
        gather_before(f"{name!r} ({kind})")
        known = isinstance(child, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm))
        entries.append(PlanEntry(name, kind, "replicate" if _has_params(child) else "pass", REPLICATE, REPLICATE,
                                 "needs the whole activation" if known else "unknown module: runs unsharded"))
    if state != REPLICATE:
        gather_before("the network output")
    return TPPlan(tp=tp, entries=entries)


def _style_of(entry: PlanEntry, module: nn.Module) -> Optional[ParallelStyle]:
    def layout(text: str, conv: bool) -> Placement:
        if text == REPLICATE:
            return Replicate()
        return Shard(1) if conv else Shard(-1)

    conv = isinstance(module, nn.Conv2d)
    if entry.style == "colwise":
        if conv:
            return ColwiseConv(input_layouts=layout(entry.input, True), output_layouts=layout(entry.output, True))
        return ColwiseParallel(input_layouts=layout(entry.input, False), output_layouts=layout(entry.output, False))
    if entry.style == "rowwise":
        if conv:
            return RowwiseConv(input_layouts=layout(entry.input, True))
        return RowwiseParallel(input_layouts=layout(entry.input, False), output_layouts=Replicate())
    if entry.style == "sharded_norm":
        return ChannelShardedNorm()
    return None


def apply_tp(
    module: nn.Sequential,
    tp_mesh: DeviceMesh,
    *,
    plan: Union[None, Mapping[str, str], TPPlan] = None,
) -> TPPlan:
    """Shard ``module`` in place over the 1-D ``tp_mesh`` (e.g. ``mesh["tp"]``); returns the plan used.

    ``plan`` is ``None`` (automatic, :func:`plan_tp`), a mapping of module name -> style name that
    overrides the automatic choices, or a finished :class:`TPPlan`. Parameters of sharded layers become
    ``DTensor`` s (full shape in ``state_dict``, a shard per rank); the rest stay plain tensors,
    identical on every rank. Works on any ``nn.Sequential`` of blocks, e.g. one pipeline stage.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tp needs a 1-D mesh, got {tp_mesh.ndim} axes {tp_mesh.mesh_dim_names}: pass mesh['tp']."
        )
    tp = tp_mesh.size()
    finished = plan if isinstance(plan, TPPlan) else plan_tp(module, tp, plan=plan)
    if finished.tp != tp:
        raise ValueError(f"the plan was made for tp={finished.tp}, the mesh has {tp} ranks: re-plan with plan_tp(..., {tp}).")
    if tp == 1:
        return finished
    leaves = dict(_leaves(module))
    styles = {}
    for entry in finished.entries:
        if entry.name not in leaves:
            raise ValueError(f"the plan names {entry.name!r}, which this module does not have.")
        style = _style_of(entry, leaves[entry.name])
        if style is not None:
            styles[entry.name] = style
    for name, style in styles.items():  # one by one: nested names of different depth
        parallelize_module(leaves[name], tp_mesh, style)
    module._tp_plan = finished
    return finished


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------
def sharded_parameter_numel(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full tensors) over the DTensor parameters of ``module``."""
    local = full = 0
    for p in module.parameters():
        if isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements):
            local += p.to_local().numel()
            full += p.numel()
    return local, full


def comm_bytes(plan: TPPlan, activation_numel: Mapping[str, tuple[int, int]], *, element_size: int = 4,
               input_requires_grad: bool = False) -> dict[str, int]:
    """Analytic bytes this rank sends and receives per training step (forward + backward) for a plan.

    ``activation_numel[name] = (input elements, output elements)`` of each module, as the full (global)
    tensor of the local batch. Collectives are counted as ring algorithms over ``tp`` ranks: an
    all-reduce of ``n`` bytes sends and receives ``2 (tp-1)/tp * n``, an all-gather of ``n`` bytes
    (the gathered size) ``(tp-1)/tp * n``. The first layer's input gradient is not computed unless
    ``input_requires_grad``.
    """
    tp = plan.tp
    if tp == 1:
        return {"sent": 0, "received": 0}
    ring = (tp - 1) / tp
    total = 0.0
    first = True
    for e in plan.entries:
        if e.name not in activation_numel:
            continue
        n_in, n_out = (n * element_size for n in activation_numel[e.name])
        grad_in = input_requires_grad or not first
        if e.style in ("colwise", "rowwise", "replicate"):
            first = False
        if e.style == "colwise":
            if e.input != REPLICATE:
                total += ring * n_in  # all-gather forward
                if grad_in:
                    total += 2 * ring * n_in  # all-reduce of the gathered input gradient backward
            elif grad_in:
                total += 2 * ring * n_in  # f: input-gradient all-reduce backward
            if e.output == REPLICATE:
                total += ring * n_out  # all-gather of the output forward (backward keeps a chunk)
        elif e.style == "rowwise":
            total += 2 * ring * n_out  # g: partial-sum all-reduce forward
            if e.input == REPLICATE and grad_in:
                total += ring * n_in  # gradient all-gather backward
    return {"sent": int(round(total)), "received": int(round(total))}
