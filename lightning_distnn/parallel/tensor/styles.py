"""Our ``ParallelStyle`` s for the layers torch's tensor parallelism does not shard correctly.

* :class:`ColwiseConv` / :class:`RowwiseConv`: ``nn.Conv2d`` sharded on output / input channels.
  The weight becomes a ``DTensor`` (``Shard(0)`` / ``Shard(1)``); the forward runs the *local*
  convolution on the local shard with explicit collectives (:mod:`.collectives`). DTensor's own
  ``conv2d`` is never called on a sharded weight: it silently mis-shards a weight split on output
  channels and rejects stride-2 convolutions (pytorch#176446); the local convolution handles any
  stride, padding and dilation exactly as the unsharded layer.
* :class:`ChannelShardedNorm`: ``BatchNorm1d/2d`` on a channel-sharded activation. Statistics are
  per channel, so each rank computes exact statistics of its channels with no traffic.

``nn.Linear`` uses torch's ``ColwiseParallel`` / ``RowwiseParallel`` (see :mod:`.plan`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_distnn._compat import conv2d_forward, swap_forward
from lightning_distnn.parallel.tensor.collectives import (
    all_reduce_in_backward,
    all_reduce_in_forward,
    gather_in_forward,
    local_input,
    mark,
)

__all__ = ["CHANNEL_NORMS", "ChannelShardedNorm", "ColwiseConv", "DepthwiseConv", "RowwiseConv"]

#: Norms with per-channel statistics, which :class:`ChannelShardedNorm` shards.
CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _as_dtensor_param(param: Optional[nn.Parameter], mesh: DeviceMesh, placement: Placement, src_data_rank):
    if param is None:
        return None
    return nn.Parameter(
        distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank),
        requires_grad=param.requires_grad,
    )


def _shard_conv(style: ParallelStyle, module: nn.Module, mesh: DeviceMesh, *, dim: Union[int, str], bias: Placement,
                tag: str, forward) -> nn.Module:
    """Turn ``module``'s weight into a DTensor sharded on ``dim`` (0: output, 1: input channels), its bias
    into ``bias``; swap in ``forward``. Errors name the layer's numbers and the fix."""
    name = type(style).__name__
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{name} shards nn.Conv2d, got {type(module).__name__}: use it on a Conv2d layer.")
    if module.groups != 1 and dim != "depthwise":
        raise ValueError(f"{name} needs groups=1, got a Conv2d with groups={module.groups}: plan it 'replicate' instead.")
    what, channels = ("out_channels", module.out_channels) if dim in (0, "depthwise") else ("in_channels", module.in_channels)
    size = mesh.size()
    if channels % size:
        raise ValueError(
            f"{name} splits {what}={channels} over tp={size} ranks, which does not divide it: use a channel count "
            f"divisible by {size}, another tp, or plan this layer 'replicate'."
        )
    if dim == "depthwise":  # one filter per channel: the local conv has one group per local channel
        module.groups, dim = module.groups // size, 0
    module.weight = _as_dtensor_param(module.weight, mesh, Shard(dim), style.src_data_rank)
    if module.bias is not None:
        module.bias = _as_dtensor_param(module.bias, mesh, bias, style.src_data_rank)
    module._tp_mesh, module._tp_style = mesh, style
    swap_forward(module, tag, forward)
    return module


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
        return _shard_conv(self, module, device_mesh, dim=0, bias=Shard(0), tag="Colwise",
                           forward=_colwise_conv_forward)

    def __repr__(self) -> str:
        return f"ColwiseConv(input_layouts={self.input_layouts}, output_layouts={self.output_layouts})"


def _colwise_conv_forward(self, x):
    style: ColwiseConv = self._tp_style
    mesh: DeviceMesh = self._tp_mesh
    group = mesh.get_group()
    x = local_input(x, mesh, style.input_layouts, Replicate())
    if torch.is_grad_enabled() and x.requires_grad:
        x = all_reduce_in_backward(x, group)
    bias = self.bias.to_local() if self.bias is not None else None
    out = conv2d_forward(self, x, self.weight.to_local(), bias)
    if isinstance(style.output_layouts, Replicate):
        out = gather_in_forward(out, group, 1)
    return mark(out, mesh, style.output_layouts, style.use_local_output)


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
        return _shard_conv(self, module, device_mesh, dim=1, bias=Replicate(), tag="Rowwise",
                           forward=_rowwise_conv_forward)

    def __repr__(self) -> str:
        return f"RowwiseConv(input_layouts={self.input_layouts})"


def _rowwise_conv_forward(self, x):
    style: RowwiseConv = self._tp_style
    mesh: DeviceMesh = self._tp_mesh
    x = local_input(x, mesh, style.input_layouts, Shard(1))
    partial = conv2d_forward(self, x, self.weight.to_local(), None)
    out = all_reduce_in_forward(partial, mesh.get_group())
    if self.bias is not None:
        out = out + self.bias.to_local().view(1, -1, 1, 1)
    return mark(out, mesh, Replicate(), style.use_local_output)


class DepthwiseConv(ParallelStyle):
    """A depthwise Conv2d (one filter per channel) on a channel-sharded activation: weight and bias ``Shard(0)``.

    Each output channel depends on its own input channel only, so input and output shard together and
    each rank convolves its channels locally (``groups`` = its channel count) with no traffic, in forward
    and backward.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not (isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels):
            raise ValueError(f"DepthwiseConv needs a depthwise Conv2d (groups == in_channels == out_channels), got "
                             f"{module!r}: plan it 'replicate'.")
        return _shard_conv(self, module, device_mesh, dim="depthwise", bias=Shard(0), tag="Depthwise",
                           forward=_depthwise_conv_forward)

    def __repr__(self) -> str:
        return "DepthwiseConv()"


def _depthwise_conv_forward(self, x):
    mesh: DeviceMesh = self._tp_mesh
    x = local_input(x, mesh, Shard(1), Shard(1))
    bias = self.bias.to_local() if self.bias is not None else None
    out = conv2d_forward(self, x, self.weight.to_local(), bias)
    return mark(out, mesh, Shard(1), self._tp_style.use_local_output)


class ChannelShardedNorm(ParallelStyle):
    """Batch norm (1d/2d) on an activation sharded on dim 1: affine weights and running stats ``Shard(0)``.

    Statistics are per channel, so each rank normalises its own channels with no traffic.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, CHANNEL_NORMS):
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
        swap_forward(module, "ChannelSharded", _sharded_norm_forward)
        return module


def _sharded_norm_forward(self, x):
    mesh: DeviceMesh = self._tp_mesh
    x = local_input(x, mesh, Shard(1), Shard(1))
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
    return mark(out, mesh, Shard(1), self._tp_style.use_local_output)


