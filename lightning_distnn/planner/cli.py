"""``distnn-plan``: rank every layout of a model on N processes with the seed's cost model.

Commands (one machine)::

    distnn-plan --world-size 10 --global-batch 40                        # the case study at full width
    distnn-plan --world-size 4 --global-batch 64 --conv-filters 32 --fc-width 256 --measure 3
    distnn-plan --model seed_net --world-size 2 --global-batch 32 --json
    distnn-plan --world-size 4 --global-batch 64 --max-memory-per-rank 200MB
    python -m lightning_distnn.planner.cli --help

It profiles the network in ``--processes`` gloo processes at once (default: the world size, so
cores shared by the run's processes are measured as shared) and measures the links between them,
caches both (``--cache-dir``), searches every layout and prints the ranked table, the winner's
T_i / S_i / M_i terms and the strategy to run it with. ``--measure K`` then trains the top K
layouts (and ``--current``) for a few steps each with ``lightning.Trainer`` and prints measured
beside predicted. A model that fits no layout exits with status 2 and says which knob to turn.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import re
import sys
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_distnn.planner.cost import Layout, predict
from lightning_distnn.planner.links import Network
from lightning_distnn.planner.plan import WholeNetwork, layer_chain, plan_layout
from lightning_distnn.planner.cache import DEFAULT_CACHE
from lightning_distnn.planner.search import NoLayoutFits, format_table

MODELS = ("case_study", "seed_net", "resnet")


def import_factory(spec: str):
    """``"package.module:function"`` -> the function (the current directory is importable, as for ``python -m``)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: write one of {', '.join(MODELS)} or module:function, e.g. "
                         "--model mynets:make_net (a function in mynets.py that returns the nn.Module).")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({err}); run distnn-plan from the directory "
                         "that holds it, or install it.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {module_name} has no function {attr!r}.")
    return fn


def build_network(model: str = "case_study", **kwargs: Any) -> nn.Sequential:
    """The networks ``distnn-plan`` knows by name, or ``module:function(**kwargs)``, as the layer chain the
    planner cuts (module-level, so spawned processes can build them). A network that is not a chain is one
    layer: data-parallel layouts only."""
    from lightning_distnn.models import CaseStudyCNN, SeedNet

    if ":" in model:
        net = import_factory(model)(**kwargs)
        if not isinstance(net, nn.Module):
            raise ValueError(f"--model {model!r} returned {type(net).__name__}, not an nn.Module.")
        return layer_chain(net)
    if model == "case_study":
        return CaseStudyCNN(**kwargs)
    if model == "seed_net":
        return SeedNet(num_classes=kwargs.get("num_classes", 10), in_channels=kwargs.get("in_channels", 3))
    if model == "resnet":  # the small ResNet-18 of models/resnet.py, as the chain of layers a pipeline cuts
        from lightning_distnn.models.resnet import resnet18_cifar
        from lightning_distnn.parallel.chain import chain_as_sequential

        net = resnet18_cifar(width=kwargs.get("resnet_width", 8), num_classes=kwargs.get("num_classes", 10),
                             in_channels=kwargs.get("in_channels", 3))
        return chain_as_sequential(net).sequential
    raise ValueError(f"Unknown model {model!r}; valid: {', '.join(MODELS)}.")


def parse_bytes(text: str) -> float:
    """``"2GB"``, ``"512MB"``, ``"64KiB"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 2GB, 512MB or 1e9.")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return float(number) * base ** " KMGT".index(unit.upper() or " ")


def parse_layout(text: str) -> dict[str, Any]:
    """``"dp=2,pp=5,schedule=1f1b,microbatches=8"`` -> keyword arguments of :class:`Layout`."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"--current {text!r}: write key=value pairs, e.g. dp=2,pp=5.")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in Layout.__dataclass_fields__:
            raise argparse.ArgumentTypeError(f"--current: unknown key {key!r}; valid: {', '.join(Layout.__dataclass_fields__)}.")
        out[key] = int(value) if value.isdigit() else value
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnn-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="case_study",
                   help=f"{', '.join(MODELS)}, or module:function returning your nn.Module (e.g. mynets:make_net)")
    m.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="keyword arguments of module:function, e.g. '{\"width\": 64}'")
    m.add_argument("--input-shape", default="", metavar="C,H,W",
                   help="one sample's shape (default: channels,image-size,image-size), e.g. 20 for vectors")
    m.add_argument("--conv-layers", type=int, default=5)
    m.add_argument("--conv-filters", type=int, default=512)
    m.add_argument("--fc-layers", type=int, default=3)
    m.add_argument("--fc-width", type=int, default=1024)
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--resnet-width", type=int, default=8, help="--model resnet: channels of its first stage")
    m.add_argument("--channels", type=int, default=3)
    m.add_argument("--classes", type=int, default=10, help="outputs of the network (--measure trains on this many classes)")
    r = p.add_argument_group("run")
    r.add_argument("--world-size", type=int, required=True, help="processes the run will have")
    r.add_argument("--global-batch", type=int, required=True, help="samples per optimizer step")
    r.add_argument("--max-memory-per-rank", type=parse_bytes, default=None, help="e.g. 2GB; layouts above it are refused")
    r.add_argument("--optimizer-states", type=int, default=1, help="tensors per parameter: SGD+momentum 1, Adam 2")
    r.add_argument("--current", type=parse_layout, default=None, help="your layout, e.g. dp=2,pp=5 (shown and measured)")
    s = p.add_argument_group("search")
    s.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b")
    s.add_argument("--compressions", default="none,fp16")
    s.add_argument("--syncs", default="allreduce,parameter_server")
    s.add_argument("--max-microbatches", type=int, default=32)
    f = p.add_argument_group("profile")
    f.add_argument("--processes", type=int, default=None, help="profile in this many processes at once (default: world size)")
    f.add_argument("--links", choices=("measure", "assumed"), default="measure")
    f.add_argument("--ranks-per-node", type=int, default=0, help="consecutive ranks per node (0: one node)")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    f.add_argument("--no-cache", action="store_true")
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10)
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--measure", type=int, default=0, metavar="K", help="train the top K layouts and compare")
    o.add_argument("--steps", type=int, default=3, help="measured steps per layout (after one warm-up step)")
    o.add_argument("--rounds", type=int, default=1, help="interleaved measuring rounds")
    return p


def launched_world() -> Optional[tuple[int, int]]:
    """(world size, processes per node) when torchrun (or another launcher setting ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``) started this process in a job of several processes, else ``None``."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")):
        return None
    world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
    return (world, local) if world > 1 else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    launched = launched_world()
    if launched is None:
        return _main(args, None)
    import torch.distributed as dist

    world, local = launched
    if args.world_size != world:
        print(f"distnn-plan: --world-size {args.world_size} but the launcher started {world} processes "
              f"(WORLD_SIZE={world}): under torchrun plan for the job's own processes, --world-size {world}.",
              file=sys.stderr)
        return 2
    if args.ranks_per_node and args.ranks_per_node != local:
        print(f"distnn-plan: --ranks-per-node {args.ranks_per_node} but torchrun runs {local} per node "
              f"(LOCAL_WORLD_SIZE); drop --ranks-per-node or make them agree.", file=sys.stderr)
        return 2
    # one process group for the whole run: profiling, links and Lightning's training all use it (a second
    # default group on torchrun's store would read this one's stale addresses: see measure_layouts_in_group);
    # called inside a job whose group exists (e.g. after a Trainer's fit), that group is used and kept
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    try:
        return _main(args, launched)
    finally:
        if owned:
            dist.destroy_process_group()


def _main(args: argparse.Namespace, launched: Optional[tuple[int, int]]) -> int:
    """``distnn-plan`` in one process (spawning ``--processes``), or in every rank of a torchrun job
    (``launched`` = (world, per node): the job's processes profile, measure links and train; rank 0 prints)."""
    rank = int(os.environ.get("RANK", 0)) if launched else 0

    def print(*values: Any, **kwargs: Any) -> None:  # noqa: A001  (rank 0 alone speaks)
        if rank == 0:
            builtins.print(*values, **kwargs)

    if args.world_size < 1 or args.global_batch < 1:
        print(f"distnn-plan: --world-size {args.world_size} and --global-batch {args.global_batch} must be positive.",
              file=sys.stderr)
        return 2
    custom = ":" in args.model
    if not custom and args.model not in MODELS:
        print(f"distnn-plan: --model {args.model!r}: write one of {', '.join(MODELS)} or module:function "
              "(a function returning your nn.Module, e.g. mynets:make_net).", file=sys.stderr)
        return 2
    if custom:
        if not isinstance(args.model_kwargs, dict) or "model" in args.model_kwargs:
            print(f"distnn-plan: --model-kwargs {args.model_kwargs!r} must be a JSON object of the function's "
                  "keyword arguments (none named 'model').", file=sys.stderr)
            return 2
        factory_kwargs: dict[str, Any] = {"model": args.model, **args.model_kwargs}
    else:
        factory_kwargs = {"model": args.model, "num_classes": args.classes, "in_channels": args.channels}
    if args.model == "case_study":
        factory_kwargs.update(conv_layers=args.conv_layers, conv_filters=args.conv_filters, fc_layers=args.fc_layers,
                              fc_width=args.fc_width, image_size=args.image_size)
    if args.model == "resnet":
        factory_kwargs["resnet_width"] = args.resnet_width
    torch.manual_seed(0)
    try:
        net = build_network(**factory_kwargs)
    except ValueError as err:
        print(f"distnn-plan: {err}", file=sys.stderr)
        return 2
    except TypeError as err:
        if not custom:
            raise
        print(f"distnn-plan: --model {args.model} with --model-kwargs {json.dumps(args.model_kwargs)} failed: {err}",
              file=sys.stderr)
        return 2
    try:
        shape = (tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape
                 else (args.channels, args.image_size, args.image_size))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        print(f"distnn-plan: --input-shape {args.input_shape!r}: write one sample's shape as positive integers, "
              "e.g. 3,32,32 or 20.", file=sys.stderr)
        return 2
    processes = args.processes if args.processes is not None else args.world_size
    options = dict(
        schedules=[x for x in args.schedules.split(",") if x],
        compressions=[x for x in args.compressions.split(",") if x],
        syncs=[x for x in args.syncs.split(",") if x],
        max_microbatches=args.max_microbatches,
    )
    try:
        plan = plan_layout(
            net, torch.randn(1, *shape), world_size=args.world_size, global_batch=args.global_batch,
            max_memory_per_rank=args.max_memory_per_rank, optimizer_states=args.optimizer_states,
            network=Network.assumed() if args.links == "assumed" else None,
            ranks_per_node=args.ranks_per_node or (launched[1] if launched and launched[1] < launched[0] else 0),
            repeats=args.repeats, cache_dir=None if args.no_cache else args.cache_dir,
            processes=processes if processes > 1 else None, factory=build_network, factory_kwargs=factory_kwargs,
            **options,
        )
    except NoLayoutFits as err:
        print(f"distnn-plan: {err}", file=sys.stderr)
        return 2
    current = None
    if args.current:
        current = _current_layout(args.current, plan, args, net)
        if isinstance(current, str):
            print(f"distnn-plan: --current: {current}", file=sys.stderr)
            return 2
    measured = calibrated = None
    if args.measure > 0:
        from lightning_distnn.planner.measure import fit_calibration, measure_layouts
        from lightning_distnn.planner.plan import save_calibration
        from lightning_distnn.planner.search import search

        chosen = [e.layout for e in plan.ranked[: args.measure]]
        if current is not None and current.layout not in chosen:
            chosen.append(current.layout)
        if launched:
            from lightning_distnn.planner.measure import measure_layouts_in_group

            measured = measure_layouts_in_group(chosen, build_network, factory_kwargs, shape, global_batch=args.global_batch,
                                                num_classes=args.classes, steps=args.steps, rounds=args.rounds)
        else:
            measured = measure_layouts(chosen, build_network, factory_kwargs, shape, global_batch=args.global_batch,
                                       num_classes=args.classes, steps=args.steps, rounds=args.rounds)
        estimates = _estimates(plan, current)
        labels = [label for label in measured if label in estimates]
        calibration = fit_calibration([estimates[k] for k in labels], [measured[k]["step_s"] for k in labels])
        if not args.no_cache and rank == 0:
            save_calibration(args.cache_dir, plan.profile.device, args.world_size, calibration)
        calibrated = search(plan.profile, plan.network, world_size=args.world_size, global_batch=args.global_batch,
                            max_memory_per_rank=args.max_memory_per_rank, optimizer_states=args.optimizer_states,
                            calibration=calibration, **options)
    if args.json:
        data = plan.to_dict()
        if current is not None:
            data["current"] = {"layout": current.layout.label, "step_s": current.step_s, "refused": current.refused}
        if measured is not None:
            data["measured"] = measured
            data["calibration"] = vars(calibrated.calibration) if calibrated is not None else None
            data["calibrated_best"] = calibrated.best.layout.label
        print(json.dumps(data, indent=1, default=str))
        return 0
    print(plan.render(args.top))
    if current is not None:
        print(f"\nyour layout {current.layout.label}: predicted {current.step_s * 1e3:.4g} ms/step "
              f"({current.step_s / plan.best.step_s:.3g}x the best)" + (f"; refused: {current.refused}" if current.refused else ""))
    if measured is not None:
        c = calibrated.calibration
        print("\nmeasured beside predicted (calibrated: T_0 = "
              f"{c.step_s * 1e3:.3g} ms/step + {c.action_s * 1e3:.3g} ms/pipeline action + {c.collective_s * 1e3:.3g} "
              f"ms/tp collective, compute x {c.compute_scale:.3g}; fitted on these "
              f"{c.fitted_on} layouts{', saved for later plans' if not args.no_cache else ''}):\n"
              + measured_table(plan, measured, current, calibrated))
        print(f"\nwith the calibration the best layout is {calibrated.best.layout.label} "
              f"({calibrated.best.step_s * 1e3:.4g} ms/step): {calibrated.strategy()}")
    return 0


def _current_layout(kwargs: dict[str, Any], plan, args, net: Optional[nn.Module] = None):
    """The estimate of the user's ``--current`` layout, or a string saying why it cannot run."""
    from lightning_distnn.partition.model import balanced

    kwargs = dict(kwargs)
    dp, pp, tp = kwargs.get("dp", 1), kwargs.get("pp", 1), kwargs.get("tp", 1)
    if isinstance(net, WholeNetwork) and (pp > 1 or tp > 1):
        return f"pp={pp}, tp={tp}: {net.note}"
    try:
        if "dp" not in kwargs:
            dp = kwargs["dp"] = max(1, args.world_size // (pp * tp))
        if pp > 1:
            kwargs.setdefault("schedule", "1f1b")
            kwargs.setdefault("microbatches", max(pp, 4))
            v = kwargs.setdefault("stages_per_rank", 2 if kwargs["schedule"] == "interleaved_1f1b" else 1)
            mu = args.global_batch / dp / kwargs["microbatches"]
            costs = [layer.time("forward", mu) + layer.time("backward", mu) for layer in plan.profile.layers]
            kwargs.setdefault("partition", tuple(balanced(costs, pp * v).counts))
        if isinstance(kwargs.get("partition"), str):
            kwargs["partition"] = tuple(int(c) for c in kwargs["partition"].split("-"))
        layout = Layout(**kwargs)
        return predict(layout, plan.profile, plan.network, global_batch=args.global_batch,
                       optimizer_states=args.optimizer_states, max_memory_per_rank=args.max_memory_per_rank)
    except (TypeError, ValueError) as err:
        return str(err)


def _estimates(plan, current=None) -> dict:
    out = {e.layout.label: e for e in plan.ranked}
    if current is not None:
        out.setdefault(current.layout.label, current)
    return out


def measured_table(plan, measured: dict[str, dict[str, Any]], current=None, calibrated=None) -> str:
    """Predicted (raw and calibrated) and measured step time per measured layout, with the relative errors."""
    raw = _estimates(plan, current)
    cal = _estimates(calibrated) if calibrated is not None else {}
    rows = []
    for label, m in measured.items():
        est = raw[label]
        row = {"layout": label, "predicted ms": est.step_s * 1e3}
        if label in cal:
            row["calibrated ms"] = cal[label].step_s * 1e3
        row["measured ms"] = m["step_s"] * 1e3
        row["error"] = abs(est.step_s - m["step_s"]) / m["step_s"]
        if label in cal:
            row["calibrated error"] = abs(cal[label].step_s - m["step_s"]) / m["step_s"]
        row["measured images/s"] = plan.global_batch / m["step_s"]
        rows.append(row)
    return format_table(rows)


if __name__ == "__main__":
    sys.exit(main())
