"""Feature parallelism (split learning) in pure torch: a bottom network per feature slice, one top.

Rank ``r`` owns the slice ``plan[r]`` of every sample's features (a strip of the image, a channel
group, a column group; :mod:`lightning_distnn.partition.features`) and the bottom network that
reads it. Forward: every rank runs its bottom on its slice, the bottom outputs are all-gathered
(:func:`gather_features`) and concatenated in rank order, and the top network (replicated on
every rank) computes the logits and the loss. Backward: the gradient of the concatenated
features is all-reduced (averaged over the replicas of the top, which makes the slices agree
even if the replicas drift) and each bottom receives its own slice of it.

All ranks see the same samples in the same order (the sampler has one replica): the data is
split by features, not by samples.

Every rank builds the same :class:`SplitNet` from the same seed; :func:`apply_feature_parallel`
then keeps only its own bottom (the others are dropped, so each rank holds one bottom + the top).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_distnn.parallel.collectives import broadcast_replicas_, flat_average_
from lightning_distnn.partition.features import FeaturePlan


class _GatherFeatures(torch.autograd.Function):
    """All-gather of per-rank features ``(B, w_r)`` into ``(B, sum w)``; backward averages and slices."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, widths: tuple[int, ...], group) -> torch.Tensor:  # type: ignore[override]
        world_size = len(widths)
        widest = max(widths)
        padded = F.pad(local, (0, widest - local.shape[1])).contiguous()
        buffers = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(buffers, padded, group=group)
        buffers[rank] = padded
        ctx.rank, ctx.widths, ctx.group = rank, widths, group
        return torch.cat([b[:, :w] for b, w in zip(buffers, widths)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # sum over the replicas of the top (gloo has no AVG)
        grad.div_(len(ctx.widths))
        start = sum(ctx.widths[: ctx.rank])
        return grad[:, start : start + ctx.widths[ctx.rank]], None, None, None


def gather_widths(local_width: int, group: Optional[dist.ProcessGroup] = None) -> tuple[int, ...]:
    """Every rank's bottom-output width (one small all-gather)."""
    mine = torch.tensor([local_width], dtype=torch.long)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return tuple(int(t.item()) for t in out)


def gather_features(
    local: torch.Tensor, *, rank: int, widths: Sequence[int], group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Differentiable all-gather of the bottoms' outputs ``(B, widths[r])`` -> ``(B, sum(widths))``."""
    if local.dim() != 2 or local.shape[1] != widths[rank]:
        raise ValueError(
            f"rank {rank}'s bottom output has shape {tuple(local.shape)}, expected (batch, {widths[rank]}): "
            "bottoms must return flat features."
        )
    return _GatherFeatures.apply(local, rank, tuple(int(w) for w in widths), group)


class SplitNet(nn.Module):
    """Bottoms (one per feature slice) -> concatenated features -> top.

    On one process it computes every bottom itself, so it is the single-process reference of the
    feature-parallel layout. After :func:`apply_feature_parallel` it runs only its own bottom and
    gathers the others' outputs.

    Args:
        bottoms: one module per slice of ``plan``; each returns ``(B, width)`` (or anything that
            flattens to it).
        top: reads the concatenation of the bottoms' outputs, in rank order.
        plan: the :class:`~lightning_distnn.partition.features.FeaturePlan`.
    """

    def __init__(self, bottoms: Sequence[nn.Module], top: nn.Module, plan: FeaturePlan) -> None:
        super().__init__()
        if len(bottoms) != plan.parts:
            raise ValueError(f"{len(bottoms)} bottoms for a feature plan of {plan.parts} slices: give one per slice.")
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.plan = plan
        self.rank: Optional[int] = None  # set by apply_feature_parallel
        self.group: Optional[dist.ProcessGroup] = None
        self._widths: Optional[tuple[int, ...]] = None

    @property
    def is_distributed(self) -> bool:
        return self.rank is not None

    def _local_input(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        piece = self.plan[rank]
        if tuple(x.shape[1:]) == piece.shape_of(self.plan.sample_shape):
            return x  # already the rank's slice (the loader cut it)
        if tuple(x.shape[1:]) != tuple(self.plan.sample_shape):
            raise ValueError(
                f"input of shape {tuple(x.shape)} is neither full samples {tuple(self.plan.sample_shape)} nor rank "
                f"{rank}'s slice {piece.shape_of(self.plan.sample_shape)}: check data.image_size against the model."
            )
        return piece.take(x)

    def bottom_features(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated bottom outputs ``(B, sum of widths)``."""
        if not self.is_distributed:
            return torch.cat([b(s.take(x)).flatten(1) for b, s in zip(self.bottoms, self.plan)], dim=1)
        local = self.bottoms[self.rank](self._local_input(x, self.rank)).flatten(1)
        if self._widths is None:
            self._widths = gather_widths(local.shape[1], self.group)
        return gather_features(local, rank=self.rank, widths=self._widths, group=self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.bottom_features(x))


def apply_feature_parallel(net: SplitNet, *, rank: int, world_size: int, group: Optional[dist.ProcessGroup] = None) -> SplitNet:
    """Make ``net`` this rank's part of the feature-parallel layout (in place): keep bottom ``rank`` and the top."""
    if not isinstance(net, SplitNet):
        raise TypeError(f"feature parallelism needs a SplitNet, got {type(net).__name__}.")
    if net.plan.parts != world_size:
        raise ValueError(
            f"the feature plan has {net.plan.parts} slices but there are {world_size} ranks: one slice per rank. "
            f"Build the model with parts={world_size} or run {net.plan.parts} processes."
        )
    if net.rank == rank:
        return net
    if net.rank is not None:
        raise ValueError(f"this SplitNet is already bound to rank {net.rank}; cannot rebind it to rank {rank}.")
    for r in range(world_size):
        if r != rank:
            net.bottoms[r] = nn.Identity()  # drop the other ranks' bottoms: each rank holds one
    net.rank, net.group = rank, group
    if dist.is_available() and dist.is_initialized():  # the top's replicas start equal, seeded or not
        broadcast_replicas_(net.top, group=group if group is not None else dist.group.WORLD)
    return net


def average_gradients(params, *, group: Optional[dist.ProcessGroup] = None) -> None:
    """Average the gradients of replicated parameters (the top) over the group, in one flat all-reduce."""
    flat_average_([p.grad for p in params if p.grad is not None], group=group)


def image_bottom(slice_shape: Sequence[int], *, width: int = 8, embed_dim: int = 32) -> nn.Sequential:
    """A small conv bottom for an image slice ``(C, h, w)``: conv-ReLU-pool, conv-ReLU-pool, linear-ReLU."""
    c, h, w = (int(s) for s in slice_shape)
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
    if min(h, w) >= 2:
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    if min(h, w) >= 2:
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(width * h * w, embed_dim), nn.ReLU()]
    return nn.Sequential(*layers)


def tabular_bottom(num_columns: int, *, embed_dim: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(int(num_columns), embed_dim), nn.ReLU())


def build_split_net(
    plan: FeaturePlan, *, num_classes: int = 10, width: int = 8, embed_dim: int = 32, top_width: int = 64
) -> SplitNet:
    """Bottoms sized to the plan's slices (conv for images, linear for columns) and an MLP top."""
    bottoms = [
        image_bottom(shape, width=width, embed_dim=embed_dim) if len(shape) == 3 else tabular_bottom(shape[0], embed_dim=embed_dim)
        for shape in plan.input_shapes()
    ]
    top = nn.Sequential(nn.Linear(embed_dim * plan.parts, top_width), nn.ReLU(), nn.Linear(top_width, num_classes))
    return SplitNet(bottoms, top, plan)
