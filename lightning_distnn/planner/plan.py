"""One call from a network to a plan: profile (cached), links, search.

Inside training processes (torch.distributed initialised, every rank calls it at once, e.g. a
strategy's setup)::

    plan = plan_layout(module.net, example_input, world_size=dist.get_world_size(), global_batch=64)
    strategy = plan.strategy().build()

Every rank profiles at the same time (so shared cores are measured as shared), the per-rank
timings are merged (median), the links are measured on the real process group, and every rank
gets the same plan. Outside (one process, e.g. ``distnn-plan``), ``processes=N`` spawns ``N``
gloo processes that do the same (:func:`probe`); ``processes=None`` profiles in this process and
assumes the links unless a :class:`~lightning_distnn.planner.links.Network` is given.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_distnn.planner.cost import Calibration
from lightning_distnn.planner.links import Network, measure_network
from lightning_distnn.planner.cache import DEFAULT_CACHE, cache_key, read_cache, write_cache
from lightning_distnn.planner.profile import (ModelProfile, default_microbatch_sizes, host_key, merge_profiles,
                                              profile_model)
from lightning_distnn.planner.search import Plan, search


class WholeNetwork(nn.Sequential):
    """A network that is not a chain of layers, as the one layer the planner profiles: nothing can be cut or
    sharded, so :func:`plan_layout` searches data-parallel layouts only and says why in the plan's notes."""

    @property
    def note(self) -> str:
        return (f"{type(self[0]).__name__} is not a chain of layers (its forward does more than call its children "
                "in order), so only data-parallel layouts were planned: write it as an nn.Sequential of blocks (or "
                "keep a torchvision ResNet's forward) to let the planner consider pipeline and tensor-parallel layouts.")


def layer_chain(network: nn.Module) -> nn.Sequential:
    """The layer sequence the planner profiles: an ``nn.Sequential`` or a known chain's layers
    (:func:`~lightning_distnn.parallel.chain.chain_as_sequential`), else the whole network as one layer."""
    from lightning_distnn.parallel.chain import chain_as_sequential

    try:
        return chain_as_sequential(network).sequential
    except TypeError:
        return WholeNetwork(network)


def calibration_key(device: str, world_size: int) -> str:
    """Cache key of the framework calibration (:class:`~lightning_distnn.planner.cost.Calibration`) of a machine."""
    return "calibration-" + "".join(c if c.isalnum() else "_" for c in device) + f"-w{world_size}"


def load_calibration(cache_dir: Optional[os.PathLike], device: str, world_size: int) -> Optional[Calibration]:
    data = read_cache(cache_dir, calibration_key(device, world_size))
    return Calibration(**data) if data else None


def save_calibration(cache_dir: Optional[os.PathLike], device: str, world_size: int, calibration: Calibration) -> None:
    write_cache(cache_dir, calibration_key(device, world_size), {"step_s": calibration.step_s,
                                                                  "action_s": calibration.action_s,
                                                                  "fitted_on": calibration.fitted_on})


def host_sharing() -> tuple[int, int]:
    """(ranks on this rank's machine, consecutive ranks per machine or 0 when one machine holds every rank).

    Machines are told apart by :func:`~lightning_distnn.planner.profile.host_key` (host name and boot
    id), so the nodes of a simulated cluster, which share one machine's cores, count as one machine.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1, 0
    keys: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, host_key())
    mine = keys.count(keys[dist.get_rank()])
    return mine, (0 if len(set(keys)) == 1 else keys.count(keys[0]))


def _profile_here(net, example_input, *, sizes, world_size, repeats, measure_links, ranks_per_node):
    """Profile (and measure links) in the current process group, every rank at once; same result on all ranks."""
    sharing, per_host = host_sharing()
    here = profile_model(net, example_input, microbatch_sizes=sizes, world_size=world_size, repeats=repeats,
                         profiled_in=dist.get_world_size() if dist.is_initialized() else 1,
                         profiled_sharing=sharing, ranks_per_host=per_host)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return here, Network.assumed()
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, here.to_dict())
    profile = merge_profiles([ModelProfile.from_dict(p) for p in parts])
    network = measure_network(ranks_per_node=ranks_per_node) if measure_links else Network.assumed()
    return profile, network


def probe_rank(rank: int, world_size: int, factory: Callable[..., nn.Sequential], factory_kwargs: dict,
               sample_shape: Sequence[int], sizes: Sequence[int], plan_world: int, repeats: int,
               measure_links: bool, ranks_per_node: int) -> tuple[dict, dict]:
    """One rank of :func:`probe` (a module-level function, so spawned processes can import it)."""
    torch.manual_seed(0)
    net = factory(**factory_kwargs)
    example = torch.randn(1, *sample_shape)
    profile, network = _profile_here(net, example, sizes=sizes, world_size=plan_world, repeats=repeats,
                                     measure_links=measure_links, ranks_per_node=ranks_per_node)
    return profile.to_dict(), network.to_dict()


def probe(factory: Callable[..., nn.Sequential], factory_kwargs: dict, sample_shape: Sequence[int], *,
          processes: int, world_size: int, sizes: Sequence[int], repeats: int = 3, measure_links: bool = True,
          ranks_per_node: int = 0, timeout: float = 1800.0) -> tuple[ModelProfile, Network]:
    """Profile ``factory(**factory_kwargs)`` and measure the links in ``processes`` spawned gloo processes."""
    from lightning_distnn.testing import run_distributed

    results = run_distributed(probe_rank, processes, factory, factory_kwargs, tuple(sample_shape), tuple(sizes),
                              world_size, repeats, measure_links, ranks_per_node, init_process_group=True,
                              timeout=timeout, pg_timeout=min(timeout, 600.0))
    profile, network = results[0]
    return ModelProfile.from_dict(profile), Network.from_dict(network)


def plan_layout(
    net: nn.Sequential,
    example_input: torch.Tensor,
    *,
    world_size: int,
    global_batch: int,
    max_memory_per_rank: Optional[float] = None,
    network: Optional[Network] = None,
    measure_links: bool = True,
    ranks_per_node: int = 0,
    optimizer_states: int = 1,
    microbatch_sizes: Optional[Sequence[int]] = None,
    repeats: int = 3,
    cache_dir: Optional[os.PathLike] = DEFAULT_CACHE,
    processes: Optional[int] = None,
    factory: Optional[Callable[..., nn.Sequential]] = None,
    factory_kwargs: Optional[dict] = None,
    calibration: Optional[Calibration] = None,
    **search_options: Any,
) -> Plan:
    """Profile ``net`` (or read its cached profile), get the links, and search every layout of ``world_size``.

    Args:
        net, example_input: the ``nn.Sequential`` to plan (:func:`layer_chain` of any network) and one input
            sample (or a batch).
        world_size: processes the run will have; global_batch: samples per optimizer step.
        max_memory_per_rank: bytes; layouts predicted above it are refused (``Plan.refused``).
        network: links to use instead of measuring (e.g. ``Network.assumed()``).
        measure_links: measure the links when running distributed (else assume them).
        ranks_per_node: consecutive ranks per node (0: one node) for multi-node links.
        optimizer_states: optimizer tensors per parameter (SGD with momentum 1, Adam 2, SGD 0).
        microbatch_sizes: sizes to time (default: powers of two up to min(global_batch, 16)).
        cache_dir: where profiles are cached (``None``: no cache).
        processes, factory, factory_kwargs: profile in that many spawned processes, each building the
            network with ``factory(**factory_kwargs)`` (outside a process group only).
        calibration: the framework's time per step / pipeline action (``T_0``); default: the one
            ``distnn-plan --measure`` saved for this device and world size in ``cache_dir``, else zero.
        search_options: passed to :func:`~lightning_distnn.planner.search.candidate_layouts`
            (``schedules``, ``syncs``, ``compressions``, ``max_microbatches``, ``tp_degrees``).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer (processes to train on).")
    if isinstance(net, WholeNetwork):
        search_options["tp_degrees"] = (1,)  # one layer: pp is 1 by itself, tensor parallelism cannot walk it
    sizes = list(microbatch_sizes or default_microbatch_sizes(global_batch))
    distributed = dist.is_available() and dist.is_initialized()
    procs = dist.get_world_size() if distributed else (processes or 1)
    key = cache_key(net, example_input, world_size=world_size, sizes=tuple(sizes), processes=procs,
                    links=bool(measure_links and network is None and procs > 1), ranks_per_node=ranks_per_node,
                    repeats=repeats)
    cached = read_cache(cache_dir, key) if not distributed or dist.get_rank() == 0 else None
    if distributed:
        box = [cached]
        dist.broadcast_object_list(box, src=0)
        cached = box[0]
    if cached is not None:
        profile = ModelProfile.from_dict(cached["profile"])
        measured = Network.from_dict(cached["network"])
    else:
        if distributed:
            profile, measured = _profile_here(net, example_input, sizes=sizes, world_size=world_size,
                                              repeats=repeats, measure_links=measure_links and network is None,
                                              ranks_per_node=ranks_per_node)
        elif procs > 1:
            if factory is None:
                raise ValueError(
                    f"processes={procs} needs factory= (a module-level function that builds the network) so the "
                    "spawned processes can build it; or leave processes=None to profile in this process."
                )
            sample_shape = tuple(example_input.shape[1:]) if example_input.dim() > 1 else tuple(example_input.shape)
            profile, measured = probe(factory, factory_kwargs or {}, sample_shape, processes=procs,
                                      world_size=world_size, sizes=sizes, repeats=repeats,
                                      measure_links=measure_links and network is None, ranks_per_node=ranks_per_node)
        else:
            profile = profile_model(net, example_input, microbatch_sizes=sizes, world_size=world_size, repeats=repeats)
            measured = Network.assumed()
        if not distributed or dist.get_rank() == 0:
            write_cache(cache_dir, key, {"profile": profile.to_dict(), "network": measured.to_dict()})
    if calibration is None:
        calibration = load_calibration(cache_dir, profile.device, world_size) if not distributed or dist.get_rank() == 0 else None
        if distributed:
            box = [calibration]
            dist.broadcast_object_list(box, src=0)
            calibration = box[0]
    plan = search(profile, network or measured, world_size=world_size, global_batch=global_batch,
                  max_memory_per_rank=max_memory_per_rank, optimizer_states=optimizer_states,
                  calibration=calibration, **search_options)
    plan.notes.append(f"profile: {'cache ' + key if cached is not None else 'measured now'} "
                      f"({profile.profiled_in} process(es) at once on {profile.device})")
    if isinstance(net, WholeNetwork):
        plan.notes.append(net.note)
    plan.profile = profile
    return plan
