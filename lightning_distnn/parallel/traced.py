"""Any network through torch.distributed.pipelining's tracer, cut where the user says.

A network that is not a chain of its children (a skip connection across blocks, a dict inside the
forward, a custom module tree) is split by :func:`torch.distributed.pipelining.pipeline`: the user
names the modules to cut *before* (``split_points=["encoder.block3", "decoder"]``, the strategies'
``partition=`` argument) or calls :func:`torch.distributed.pipelining.pipe_split` in the forward.
:func:`traced_view` returns the same :class:`~lightning_distnn.parallel.chain.ChainView` the chain
path returns, one layer per stage, so OUR runtime (every schedule, the timeline, checkpoints) runs it:

* **one tensor per boundary.** A traced stage may pass several values to the next (the skip
  connection's tensor beside the block's output); the runtime's stages are ``nn.Sequential`` s of one
  input, so the values are packed per sample into one ``[batch, n]`` tensor and unpacked by the next
  stage (same dtype, leading batch dimension; anything else is refused with the cut to move);
* **shared state.** The tracer's stage modules use the network's own parameters and buffers (BatchNorm's
  running statistics are updated in place, as one process would); :func:`owners` lists, per stage,
  the network's own modules that hold them, so state-dict keys stay those of the unsplit network;
* **one graph per (mode, micro-batch size).** The tracer records one shape and one mode: a view such as
  ``x.view(4, -1)`` keeps the traced batch size and BatchNorm keeps train or eval behaviour. A stage
  traces again (locally, deterministically) for a new micro-batch size or mode, and follows the mode
  of the network modules it runs;
* **tied weights across stages are refused**: the tracer gives the later stage a *copy*, which would
  train apart from the original silently.

Pure torch. Tensor parallelism of traced stages is not supported (their layers are graph nodes).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.distributed.pipelining import SplitPoint, pipeline

from lightning_distnn.parallel.chain import ChainView, buffers_kept
from lightning_distnn.partition.model import StagePlan, explicit

__all__ = ["TracedStage", "calls_pipe_split", "check_split_points", "cut_traced", "is_split_points", "network_of", "owners", "trace", "traced_view"]


#: the fix for a network that is neither an nn.Sequential nor a known chain, under a pipeline
TRACER_HINT = (
    "Under a pipeline (tp=1) any network can be cut by torch's tracer: name the modules to cut before, e.g. "
    "partition=['encoder.block3', 'decoder'], or call torch.distributed.pipelining.pipe_split() in its forward."
)


def is_split_points(partition: Any) -> bool:
    """Whether a strategy's ``partition=`` names modules to cut before (a non-empty list of strings)."""
    return isinstance(partition, (list, tuple)) and len(partition) > 0 and all(isinstance(p, str) for p in partition)


def calls_pipe_split(net: nn.Module) -> bool:
    """Whether the forward of ``net`` or of one of its modules calls ``pipe_split()`` (read from the source code;
    ``False`` where the source is unavailable: name the split points then)."""
    for cls in {type(m) for m in net.modules()}:
        try:
            if "pipe_split(" in inspect.getsource(cls.forward):
                return True
        except (OSError, TypeError):
            continue
    return False


def check_split_points(points: Sequence[str], net: Optional[nn.Module] = None) -> list[str]:
    """Validate module names to cut before (unique, non-empty, modules of ``net`` when given)."""
    points = list(points)
    if not points or any(not isinstance(p, str) or not p for p in points) or len(set(points)) != len(points):
        raise ValueError(
            f"partition={points!r} must list distinct module names to cut before, e.g. ['encoder.block3', 'decoder'] "
            "(2 names = 3 stages)."
        )
    if net is not None:
        known = dict(net.named_modules())
        missing = [p for p in points if p in ("",) or p not in known]
        if missing:
            sample = ", ".join(list(n for n in known if n)[:12])
            raise ValueError(
                f"partition names {missing} are not modules of {type(net).__name__} (its modules include: {sample}, "
                "...): give dotted names as in net.named_modules()."
            )
    return points


def trace(net: nn.Module, example: torch.Tensor, split_points: Sequence[str] = ()):
    """torch's tracer on ``net`` for one micro-batch ``example`` (``net``'s buffers and forwards are kept).

    torch marks a split point by wrapping that module's ``forward`` for good; the wrappers are removed
    afterwards, so ``net`` runs (and traces again) as the user wrote it.
    """
    spec = {name: SplitPoint.BEGINNING for name in split_points}
    marked = [net.get_submodule(name) for name in spec]
    saved = [{k: m.__dict__[k] for k in ("forward", "_orig_forward") if k in m.__dict__} for m in marked]
    try:
        with buffers_kept(net):
            return pipeline(net, mb_args=(example,), split_spec=spec or None)
    finally:
        for module, attrs in zip(marked, saved):
            for k in ("forward", "_orig_forward"):
                module.__dict__.pop(k, None)
            module.__dict__.update(attrs)


def owners(net: nn.Module, stage: nn.Module, unused: frozenset = frozenset()) -> list[tuple[str, nn.Module]]:
    """The network's own modules holding the state of one traced ``stage`` module, as (dotted path, module).

    Each module is the outermost one all of whose parameters and buffers the stage holds (``encoder.b1``,
    not ``encoder`` when ``encoder.b2`` is on another stage); ``unused`` (ids of tensors no stage uses, such
    as BatchNorm's batch count in eval mode) go with their module. Raises ``ValueError`` for a stage tensor
    that is not the network's own (a tied weight the tracer copied).
    """
    _check_own(net, stage)
    used = {id(t) for t in (*stage.parameters(), *stage.buffers())}
    mine = used | unused
    picked: list[tuple[str, nn.Module]] = []
    for name, module in net.named_modules():
        if any(name.startswith(p + ".") or p == "" for p, _ in picked):
            continue
        tensors = [id(t) for t in (*module.parameters(), *module.buffers())]
        if any(t in used for t in tensors) and all(t in mine for t in tensors):
            picked.append((name, module))
    covered = {id(t) for _, m in picked for t in (*m.parameters(), *m.buffers())}
    loose = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if id(t) in used and id(t) not in covered]
    if loose:
        raise ValueError(
            f"{type(net).__name__}'s tensors {loose} belong to a module split over two stages, so the stage cannot keep "
            "the unsplit network's state-dict keys: hold them in a child module of their own (e.g. a small nn.Module "
            "with the nn.Parameter), or move the cut."
        )
    return picked


def _check_own(net: nn.Module, stage: nn.Module) -> None:
    """Refuse a traced stage holding a tensor that is not the network's own (a tied weight the tracer copied)."""
    originals = {id(t) for t in (*net.parameters(), *net.buffers())}
    foreign = [n for n, t in (*stage.named_parameters(), *stage.named_buffers()) if id(t) not in originals]
    if foreign:
        raise ValueError(
            f"{type(net).__name__} uses {foreign} in two pipeline stages (tied weights): torch's tracer gives the later "
            "stage a copy, which would train apart from the original. Put every module that uses the weight in one "
            "stage (move the cut), or untie the weights."
        )


def _flat_values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, tuple) else [value]


class TracedStage(nn.Module):
    """Stage ``index`` of a traced network: one packed tensor in, one packed tensor out (see the module docstring).

    The first stage takes the network's input as it is; the last returns the network's output.
    ``boundary[i]`` is the (per-sample shape, dtype) of each value crossing into stage ``i + 1``.
    """

    def __init__(self, *, net: nn.Module, index: int, num_stages: int, split_points: Sequence[str],
                 graph: nn.Module, micro_size: int, sample: tuple[tuple[int, ...], torch.dtype],
                 boundary: list[list[tuple[tuple[int, ...], torch.dtype]]], modes: list[nn.Module]) -> None:
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.split_points = list(split_points)
        self.boundary = boundary
        self.sample = sample
        object.__setattr__(self, "_net", net)  # not a child: the state is the network's (registered via owners)
        self.graphs = nn.ModuleDict({self._key(net.training, micro_size): graph})
        object.__setattr__(self, "_modes", modes)

    @staticmethod
    def _key(training: bool, size: int) -> str:
        return f"{'train' if training else 'eval'}_{size}"

    def _graph(self, training: bool, size: int) -> nn.Module:
        key = self._key(training, size)
        if key not in self.graphs:
            was = self._net.training
            self._net.train(training)
            try:
                example = torch.zeros((size, *self.sample[0]), dtype=self.sample[1], device=_device_of(self._net))
                pipe = trace(self._net, example, self.split_points)
            finally:
                self._net.train(was)
            graph = pipe.get_stage_module(self.index)
            _check_own(self._net, graph)  # the network's own tensors, or the tied-weight error
            self.graphs[key] = graph
        return self.graphs[key]

    def forward(self, x: torch.Tensor) -> Any:
        size = int(x.shape[0])
        training = any(m.training for m in self._modes) if self._modes else self.training
        args = [x] if self.index == 0 else _unpack(x, self.boundary[self.index - 1])
        out = self._graph(training, size)(*args)
        if self.index == self.num_stages - 1:
            return out
        return _pack(_flat_values(out), size)


def _device_of(net: nn.Module) -> torch.device:
    for t in (*net.parameters(), *net.buffers()):
        return t.device
    return torch.device("cpu")


def _pack(values: list[Any], size: int) -> torch.Tensor:
    return torch.cat([v.reshape(size, -1) for v in values], dim=1)


def _unpack(packed: torch.Tensor, spec: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    sizes = [math.prod(shape) for shape, _ in spec]
    parts = packed.split(sizes, dim=1)
    return [p.reshape(packed.shape[0], *shape) for p, (shape, _) in zip(parts, spec)]


def _boundary(values: list[Any], size: int, cut: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    spec = []
    for i, v in enumerate(values):
        ok = isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size and v.is_floating_point()
        if not ok:
            what = f"a {type(v).__name__}" if not isinstance(v, torch.Tensor) else f"a {v.dtype} tensor of shape {tuple(v.shape)}"
            raise ValueError(
                f"the cut {cut} passes {what} (value {i}) between pipeline stages; a stage boundary carries floating "
                f"tensors whose first dimension is the micro-batch ({size}). Move the cut where only activations cross."
            )
        spec.append((tuple(v.shape[1:]), v.dtype))
    if len({d for _, d in spec}) > 1:
        raise ValueError(f"the cut {cut} passes tensors of several dtypes {[d for _, d in spec]}: move the cut.")
    return spec


def traced_view(net: nn.Module, example: torch.Tensor, split_points: Sequence[str] = (), *, micro_size: Optional[int] = None) -> tuple[ChainView, list[list[tuple[str, nn.Module]]]]:
    """``net`` cut by torch's tracer: a :class:`ChainView` with one :class:`TracedStage` per stage, and per stage
    the network's own modules that hold its state (:func:`owners`).

    ``split_points`` are module names to cut before (none: the ``pipe_split()`` calls of the forward);
    ``example`` is a batch of inputs, traced at ``micro_size`` samples (default: all of it). Raises
    ``ValueError`` naming the network and both ways to cut it when the tracer finds a single stage.
    """
    check_split_points(split_points, net) if split_points else None
    size = int(micro_size or example.shape[0])
    micro = example[:size].to(_device_of(net))
    pipe = trace(net, micro, split_points)
    n = pipe.num_stages
    if n < 2:
        raise ValueError(
            f"{type(net).__name__} has no cut points: its forward is not a known chain of children and the tracer found "
            "no split. Give the modules to cut before, e.g. PipelineStrategy(partition=['encoder.block3', 'decoder']) "
            "(names from net.named_modules()), or call torch.distributed.pipelining.pipe_split() in its forward where "
            "a stage should end."
        )
    graphs = [pipe.get_stage_module(i) for i in range(n)]
    seen = {id(t) for g in graphs for t in (*g.parameters(), *g.buffers())}
    unused = frozenset(id(t) for t in (*net.parameters(), *net.buffers()) if id(t) not in seen)
    holders = [owners(net, g, unused) for g in graphs]
    # the values crossing each boundary, from one forward of the stages (state kept, no gradients)
    boundary: list[list[tuple[tuple[int, ...], torch.dtype]]] = []
    names = list(split_points) or [f"pipe_split() #{i + 1}" for i in range(n - 1)]
    with buffers_kept(net), torch.no_grad():
        values: list[Any] = [micro]
        for i, g in enumerate(graphs[:-1]):
            values = _flat_values(g(*values))
            boundary.append(_boundary(values, size, f"before {names[i]!r}" if split_points else f"at {names[i]}"))
    sample = (tuple(example.shape[1:]), example.dtype)
    stages = [
        TracedStage(net=net, index=i, num_stages=n, split_points=split_points, graph=g, micro_size=size,
                    sample=sample, boundary=boundary, modes=[m for _, m in holders[i]])
        for i, g in enumerate(graphs)
    ]
    view = ChainView(nn.Sequential(*stages), tuple(f"(stage {i})" for i in range(n)))
    return view, holders


def network_of(module: nn.Module, attr: Optional[str] = None) -> tuple[str, nn.Module]:
    """The network to trace in a LightningModule: the ``attr`` child, else its only child holding parameters."""
    if attr is not None:
        net = getattr(module, attr, None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"{type(module).__name__}.{attr} is {type(net).__name__}, not a network: fix module_attr.")
        return attr, net
    found = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    if len(found) != 1:
        raise TypeError(
            f"{type(module).__name__} has {len(found)} children with parameters ({', '.join(n for n, _ in found) or 'none'}): "
            "name the network to split with the strategy's module_attr argument, e.g. module_attr='net'."
        )
    return found[0]


def cut_traced(net: nn.Module, example: torch.Tensor, *, split_points: Sequence[str] = (), microbatches: int,
               num_stages: int) -> tuple[ChainView, list[list[tuple[str, nn.Module]]], StagePlan]:
    """:func:`traced_view` at the micro-batch size of ``example`` split ``microbatches`` ways, with the plan
    (one view layer per stage); ``ValueError`` when the tracer's stage count is not ``num_stages``."""
    view, holders = traced_view(net, example, split_points, micro_size=max(1, int(example.shape[0]) // microbatches))
    found = len(view.sequential)
    if found != num_stages:
        how = f"{len(split_points)} split points" if split_points else f"{found - 1} pipe_split() calls"
        raise ValueError(
            f"{type(net).__name__} cut by {how} makes {found} stages, the layout has {num_stages} (pp x stages_per_rank): "
            f"give {num_stages - 1} module names in partition=, or change pp."
        )
    return view, holders, explicit([1] * found)
