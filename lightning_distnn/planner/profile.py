"""Profile of a network for the planner: what each top-level layer costs in time and bytes.

A :class:`ModelProfile` is plain data, measured once per (model, input shape, device, world size)
and cached on disk as JSON (:mod:`lightning_distnn.planner.cache`), so a second plan of the same model is fast.
Per top-level layer of an ``nn.Sequential`` (the unit the pipeline partitioner cuts between) it holds

* forward and backward seconds at several micro-batch sizes (interpolated linearly in between and
  extrapolated linearly beyond the largest one: :meth:`LayerProfile.time`);
* parameter bytes (gradients take the same, optimizer states a multiple);
* the bytes of the layer's output per sample: what crosses a pipeline cut after this layer;
* the bytes autograd saves for the backward per sample (measured with ``saved_tensors_hooks``);
* the leaves the tensor-parallel planner sees, with their input/output sizes per sample, so the
  tensor-parallel communication of any ``tp`` can be counted without the module.

Profile inside the processes that will train (:func:`profile_in_processes`) when several
processes share the cores: every rank then profiles at the same time and the timings are the
contended ones the run will see.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_distnn.parallel.tensor.accounting import module_numel

PROFILE_VERSION = 7


@dataclass
class Leaf:
    """One module as the tensor-parallel planner walks it: name relative to the network, kind, sizes per sample."""

    name: str
    kind: str
    in_numel: int
    out_numel: int


@dataclass
class TPCost:
    """What tensor parallelism of degree ``tp`` does to one layer (from the tensor-parallel plan of the whole network).

    ``sharded``: fraction of the layer's parameters split over the ``tp`` ranks (its compute is
    assumed to split the same way); ``bytes_per_sample``: bytes each rank sends in the layer's
    collectives per sample, forward + backward (ring-counted, as ``parallel.tensor.comm_bytes``);
    ``collectives``: how many collectives per micro-batch; ``out_sharded``: the layer's output
    stays sharded (a pipeline cut after it must gather it); ``sharded_in``: the modules of the
    layer whose input is sharded, so that what they save for the backward (their input, or their
    output for an activation, which is sharded alike) is split over the ranks; the others save
    full-size tensors (a column-wise layer keeps its replicated input); ``modules``: every module of
    the layer the plan names (a leaf that holds several, e.g. a residual block, splits by their share).
    """

    sharded: float
    bytes_per_sample: float
    collectives: int
    out_sharded: bool
    sharded_in: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


@dataclass
class LayerProfile:
    """Measured costs of one top-level layer (block) of the network.

    ``forward_s[b]`` / ``backward_s[b]``: median seconds at micro-batch size ``b`` (JSON keys are strings).
    """

    index: int
    name: str
    forward_s: dict[int, float]
    backward_s: dict[int, float]
    param_bytes: int
    out_bytes: int
    saved_bytes: int
    leaves: list[Leaf] = field(default_factory=list)
    tp: dict[int, "TPCost"] = field(default_factory=dict)
    leaf_saved: list[int] = field(default_factory=list)  # saved bytes per sample of each leaf (a storage counts once)
    # bytes per sample of its input the layer saves and the layer before already saved (a ReLU's output that the
    # next block's convolution saves as its input): counted there, not in ``saved_bytes``; a stage that starts
    # with this layer holds them itself
    input_shared: int = 0

    def time(self, kind: str, batch: float) -> float:
        """Seconds of ``kind`` ("forward" or "backward") at micro-batch ``batch``, piecewise linear in it."""
        table = self.forward_s if kind == "forward" else self.backward_s
        sizes = sorted(table)
        if batch <= sizes[0] or len(sizes) == 1:
            return table[sizes[0]] * batch / sizes[0] if len(sizes) == 1 else table[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if batch <= hi:
                w = (batch - lo) / (hi - lo)
                return table[lo] * (1 - w) + table[hi] * w
        lo, hi = sizes[-2], sizes[-1]
        slope = max((table[hi] - table[lo]) / (hi - lo), table[hi] / hi * 0.5)
        return table[hi] + slope * (batch - hi)


@dataclass
class ModelProfile:
    """Everything the cost model needs to know about a network, as plain data (JSON round trip)."""

    layers: list[LayerProfile]
    input_bytes: int  # per sample
    element_size: int = 4
    optimizer_s_per_param: float = 0.0  # seconds of one optimizer step per parameter element
    device: str = "cpu"
    world_size: int = 1
    signature: str = ""
    profiled_in: int = 1  # processes that profiled at the same time
    # CPU sharing (the cost model's oversubscription term; see cost.py): cores this process may run on
    # (os.sched_getaffinity; 0 = not a shared CPU, e.g. a GPU: no term), torch's intra-op threads per
    # process, how many of the profiling processes shared those cores, and consecutive ranks per host
    # (0 = every rank of the run on one host, as on one machine or a simulated cluster).
    cores: int = 0
    threads: int = 1
    profiled_sharing: int = 1
    ranks_per_host: int = 0

    @property
    def rank_slots(self) -> float:
        """How many ranks a host runs at full speed at once: cores / cores one rank uses (0: no sharing model)."""
        if self.cores <= 0:
            return 0.0
        return self.cores / max(1, min(self.threads, self.cores))

    @property
    def profile_slowdown(self) -> float:
        """How much slower the layers ran while profiling than on a core of their own (>= 1)."""
        slots = self.rank_slots
        return max(1.0, self.profiled_sharing / slots) if slots else 1.0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelProfile":
        data = dict(data)
        data.pop("version", None)
        layers = []
        for raw in data.pop("layers"):
            raw = dict(raw)
            raw["forward_s"] = {int(k): float(v) for k, v in raw["forward_s"].items()}
            raw["backward_s"] = {int(k): float(v) for k, v in raw["backward_s"].items()}
            raw["leaves"] = [Leaf(**leaf) for leaf in raw.get("leaves", [])]
            raw["tp"] = {int(k): TPCost(**v) for k, v in raw.get("tp", {}).items()}
            layers.append(LayerProfile(**raw))
        return cls(layers=layers, **data)

    def __str__(self) -> str:
        sizes = sorted(self.layers[0].forward_s) if self.layers else []
        b = sizes[-1] if sizes else 1
        lines = [
            f"profile of {self.num_layers} layers on {self.device} ({self.profiled_in} process(es) at once), "
            f"times at micro-batch {b}",
            "| layer | name | fwd ms | bwd ms | params MB | out KB/sample | saved KB/sample |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            lines.append(
                f"| {layer.index} | {layer.name} | {layer.time('forward', b) * 1e3:.3g} | "
                f"{layer.time('backward', b) * 1e3:.3g} | {layer.param_bytes / 1e6:.3g} | "
                f"{layer.out_bytes / 1e3:.3g} | {layer.saved_bytes / 1e3:.3g} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Modules in execution order, nested ``nn.Sequential`` walked (as the tensor-parallel planner does)."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_leaves(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]


def _describe(block: nn.Module) -> str:
    parts = []
    for _, leaf in _leaves(block):
        if isinstance(leaf, nn.Conv2d):
            parts.append(f"Conv{leaf.in_channels}-{leaf.out_channels}")
        elif isinstance(leaf, nn.Linear):
            parts.append(f"Linear{leaf.in_features}-{leaf.out_features}")
        else:
            parts.append(type(leaf).__name__)
    return "+".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaf_sizes(net: nn.Sequential, sample: torch.Tensor) -> list[Leaf]:
    """Input/output elements per sample of every leaf (in execution order), from one forward of one sample."""
    leaves = _leaves(net)
    sizes = module_numel(net, sample, [name for name, _ in leaves])
    return [Leaf(name, type(leaf).__name__, *sizes[name]) for name, leaf in leaves if name in sizes]


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
    """Bytes autograd keeps for the backward of ``layer`` on input ``x`` (parameters excluded), in all and per leaf.

    A storage saved by several leaves (a ReLU's output that the next pooling saves as its input)
    counts once, for the first leaf that saves it.
    """
    return _saved_in_chain(nn.Sequential(layer), x)[0]


def _saved_in_chain(net: nn.Sequential, x: torch.Tensor) -> list[tuple[int, list[int]]]:
    """Per top-level layer of ``net``: the bytes autograd keeps for the backward (parameters excluded), in all and
    per leaf, a storage counted once in the whole forward, for the first layer (and leaf) that saves it. Where a
    layer saves its input and the layer before saved the same tensor as its output, the bytes fall on the layer
    before."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: set[tuple[int, int]] = set()
    per_layer = [[0] * len(_leaves(block)) for block in net.children()]
    current = [0, 0]

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.untyped_storage().nbytes())
        if ptr not in params and key not in seen:
            seen.add(key)
            per_layer[current[0]][current[1]] += t.untyped_storage().nbytes()
        return t

    def enter(layer, leaf):
        def hook(module, inputs):
            current[0], current[1] = layer, leaf
        return hook

    hooks = [leaf.register_forward_pre_hook(enter(i, j))
             for i, block in enumerate(net.children()) for j, (_, leaf) in enumerate(_leaves(block))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return [(sum(leaves), leaves) for leaves in per_layer]


def default_microbatch_sizes(max_batch: int, *, cap: int = 16) -> list[int]:
    """Powers of two up to ``min(max_batch, cap)`` (and that bound itself): the sizes profiled."""
    top = max(1, min(max_batch, cap))
    sizes = [1]
    while sizes[-1] * 2 <= top:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def profile_model(
    net: nn.Sequential,
    example_input: torch.Tensor,
    *,
    microbatch_sizes: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 3,
    warmup: int = 1,
    world_size: int = 1,
    profiled_in: int = 1,
    profiled_sharing: Optional[int] = None,
    ranks_per_host: int = 0,
    tp_degrees: Optional[Sequence[int]] = None,
) -> ModelProfile:
    """Measure a :class:`ModelProfile` of ``net`` on the device its parameters live on.

    ``example_input`` is one sample or a batch (its first dim is ignored: the sample shape counts).
    Each layer is timed on the activation shape it really sees, forward and backward separately;
    the first layer's backward does not compute an input gradient (training does not either).
    ``tp_degrees``: tensor-parallel degrees to count (default: the divisors of ``world_size`` above 1).
    ``profiled_sharing``: processes profiling on this host's cores at the same time (default
    ``profiled_in``); ``ranks_per_host``: consecutive ranks per host in the run (0: all on one host).
    """
    if tp_degrees is None:
        tp_degrees = [d for d in range(2, world_size + 1) if world_size % d == 0]
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        raise TypeError(
            f"the planner profiles a non-empty nn.Sequential (the layers a pipeline cuts between), got "
            f"{type(net).__name__}: pass ImageClassifier.net or wrap your blocks in nn.Sequential."
        )
    sizes = sorted({int(b) for b in microbatch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"microbatch_sizes={list(microbatch_sizes)} must be positive integers, e.g. (1, 2, 4, 8).")
    device = next((p.device for p in net.parameters()), example_input.device)
    sample = example_input[:1].to(device) if example_input.dim() > 1 else example_input.unsqueeze(0).to(device)
    was_training = net.training
    net.train()
    try:
        leaves = _leaf_sizes(net, sample)
        by_layer: dict[str, list[Leaf]] = {}
        for leaf in leaves:
            by_layer.setdefault(leaf.name.split(".")[0], []).append(leaf)
        blocks = list(net.named_children())
        top = sizes[-1]
        # rounds: every round times every layer at every size, in the order training runs them, and a
        # layer's figure is its median over the rounds, so a pause of the machine costs one round of
        # every layer, not all the samples of one layer (which skewed the stage split and T_1)
        f_samples = {(i, b): [] for i in range(len(blocks)) for b in sizes}
        b_samples = {(i, b): [] for i in range(len(blocks)) for b in sizes}
        chain: list[torch.Tensor] = []  # each layer's input at the largest size, then the last one's output (last round)
        for r in range(warmup + repeats):
            current = {b: sample.expand(b, *sample.shape[1:]).contiguous() for b in sizes}
            chain = []
            for index, (name, block) in enumerate(blocks):
                chain.append(current[top])
                outputs = {}
                for b, x in current.items():
                    inp = x.detach().requires_grad_(index > 0 and x.is_floating_point())
                    _sync(device)
                    t0 = time.perf_counter()
                    out = block(inp)
                    _sync(device)
                    t1 = time.perf_counter()
                    if out.requires_grad:
                        out.backward(torch.ones_like(out))
                    _sync(device)
                    t2 = time.perf_counter()
                    if r >= warmup:
                        f_samples[index, b].append(t1 - t0)
                        b_samples[index, b].append(t2 - t1)
                    outputs[b] = out.detach()
                current = outputs
            chain.append(current[top])  # the last layer's output
        layers: list[LayerProfile] = []
        for index, (name, block) in enumerate(blocks):
            fwd = {b: statistics.median(f_samples[index, b]) for b in sizes}
            bwd = {b: statistics.median(b_samples[index, b]) for b in sizes}
            saved, leaf_saved = _saved_bytes(block, chain[index].detach().requires_grad_(index > 0))
            saved //= top
            layers.append(
                LayerProfile(
                    index=index,
                    name=_describe(block),
                    forward_s=fwd,
                    backward_s=bwd,
                    param_bytes=sum(p.numel() * p.element_size() for p in block.parameters()),
                    out_bytes=chain[index + 1][0].numel() * chain[index + 1].element_size(),
                    saved_bytes=int(saved),
                    leaves=by_layer.get(name, []),
                    leaf_saved=[b // top for b in leaf_saved],
                )
            )
        # a tensor saved by two neighbouring layers (one's output, the next one's input) is held once
        for layer, (saved, leaf_saved) in zip(layers, _saved_in_chain(net, sample.expand(top, *sample.shape[1:]).contiguous())):
            shared = layer.saved_bytes - saved // top
            if shared > 0 and len(leaf_saved) == len(layer.leaf_saved):
                layer.input_shared = int(shared)
                layer.saved_bytes = int(saved // top)
                layer.leaf_saved = [b // top for b in leaf_saved]
        optimizer_s = _optimizer_step_seconds(net, repeats=repeats)
        for degree in tp_degrees:
            for layer, cost in zip(layers, tp_costs(net, degree, leaves, sample)):
                layer.tp[degree] = cost
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    n_params = sum(p.numel() for p in net.parameters()) or 1
    return ModelProfile(
        layers=layers,
        input_bytes=sample.numel() * sample.element_size(),
        element_size=sample.element_size() if sample.is_floating_point() else 4,
        optimizer_s_per_param=optimizer_s / n_params,
        device=_device_name(device),
        world_size=world_size,
        signature=model_signature(net, example_input, device=device, world_size=world_size),
        profiled_in=profiled_in,
        cores=available_cores() if device.type == "cpu" else 0,
        threads=torch.get_num_threads(),
        profiled_sharing=profiled_sharing if profiled_sharing is not None else profiled_in,
        ranks_per_host=ranks_per_host,
    )


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_key() -> str:
    """Identifies the machine (not the network namespace): processes with equal keys share its cores."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}|{boot}"


def tp_costs(net: nn.Sequential, tp: int, leaves: Sequence[Leaf], sample: Optional[torch.Tensor] = None) -> list[TPCost]:
    """Per top-level layer, what the automatic tensor-parallel plan of degree ``tp`` costs (see :class:`TPCost`)."""
    from lightning_distnn.parallel.tensor import REPLICATE, comm_bytes, plan_tp

    plan = plan_tp(net, tp)
    sizes = {leaf.name: (leaf.in_numel, leaf.out_numel) for leaf in leaves}
    modules = dict(net.named_modules())
    missing = [e.name for e in plan.entries if e.name not in sizes and e.name in modules]
    if missing and sample is not None:  # sharded modules inside a block (a residual block's convolutions)
        sizes.update(module_numel(net, sample, missing))
    out: list[TPCost] = []
    first = True
    for index, (name, block) in enumerate(net.named_children()):
        total = sum(p.numel() for p in block.parameters()) or 1
        sharded = sent = 0.0
        collectives = 0
        out_sharded = False
        sharded_in, named = [], []
        for entry in plan.entries:
            if entry.name.split(".")[0] != name:
                continue
            named.append(entry.name)
            if entry.input != REPLICATE:
                sharded_in.append(entry.name)
            if entry.style in ("colwise", "rowwise"):
                weight = getattr(modules[entry.name], "weight", None)
                sharded += weight.numel() if weight is not None else 0
                bias = getattr(modules[entry.name], "bias", None)
                if entry.style == "colwise" and bias is not None:
                    sharded += bias.numel()
            if entry.name in sizes:
                one = comm_bytes(plan, {entry.name: sizes[entry.name]}, input_requires_grad=not first)["sent"]
                sent += one
                if entry.style == "colwise":
                    collectives += (entry.input != REPLICATE) * (1 + (not first)) + (entry.input == REPLICATE) * (not first)
                    collectives += entry.output == REPLICATE
                elif entry.style == "rowwise":
                    collectives += 1 + (entry.input == REPLICATE and not first)
            if entry.style in ("colwise", "rowwise", "replicate"):
                first = False
            out_sharded = entry.output != REPLICATE
        out.append(TPCost(sharded=sharded / total, bytes_per_sample=sent, collectives=collectives,
                          out_sharded=out_sharded, sharded_in=sharded_in, modules=named))
    return out


def optimizer_states_of(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of a parameter's size that ``optimizer`` keeps per parameter (the memory model's ``M_3``):
    SGD 0 (1 with momentum), Adam 2 (3 with amsgrad), RMSprop 1-3, ... Found by stepping an optimizer of the
    same class and settings (its first group's) on a throwaway parameter, so any ``torch.optim`` class works."""
    import inspect

    accepted = inspect.signature(type(optimizer).__init__).parameters
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    # a group also holds keys the constructor does not take (a scheduler's initial_lr, AdamW's flags)
    defaults = {k: v for k, v in group.items() if k != "params" and k in accepted}
    probe = torch.zeros(3, 5, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    trial = type(optimizer)([probe], **defaults)
    trial.step()
    return sum(1 for v in trial.state[probe].values() if torch.is_tensor(v) and v.shape == probe.shape)


def _optimizer_step_seconds(net: nn.Module, *, repeats: int) -> float:
    """Median seconds of one SGD-with-momentum step over all of ``net``'s parameters (on copies)."""
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    samples = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        opt.step()
        if r:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def model_signature(net: nn.Module, example_input: torch.Tensor, *, device: Any, world_size: int) -> str:
    """Cache key: the network's structure and parameter shapes, the sample shape, the device and the world size."""
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in net.named_parameters()]
    sample = tuple(example_input.shape[1:]) if example_input.dim() > 1 else tuple(example_input.shape)
    text = repr((type(net).__name__, repr(net), shapes, sample, _device_name(torch.device(device)), world_size,
                 torch.__version__, PROFILE_VERSION))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# profiles of several ranks
# --------------------------------------------------------------------------------------------
def merge_profiles(profiles: Sequence[ModelProfile]) -> ModelProfile:
    """One profile from several ranks' (timings: the median over ranks; bytes are equal)."""
    first = profiles[0]
    layers = []
    for i, layer in enumerate(first.layers):
        fwd = {b: statistics.median(p.layers[i].forward_s[b] for p in profiles) for b in layer.forward_s}
        bwd = {b: statistics.median(p.layers[i].backward_s[b] for p in profiles) for b in layer.backward_s}
        layers.append(LayerProfile(**{**asdict(layer), "forward_s": fwd, "backward_s": bwd, "leaves": layer.leaves,
                                      "tp": layer.tp, "leaf_saved": list(layer.leaf_saved)}))
    opt = statistics.median(p.optimizer_s_per_param for p in profiles)
    return ModelProfile(**{**asdict(first), "layers": layers, "optimizer_s_per_param": opt,
                           "profiled_in": len(profiles)})
