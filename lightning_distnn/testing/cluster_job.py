"""Equivalence job for the simulated cluster: train every named case with the public strategies and
write each rank's final weights, for a test to compare with one process.

Run by torchrun on every node (``lightning_distnn.testing.cluster`` does that)::

    distnn-cluster --nodes 2 --procs-per-node 1 -- python -m lightning_distnn.testing.cluster_job --out /tmp/w dp ps local_sgd pipeline tp
    distnn-cluster --nodes 2 --procs-per-node 2 -- python -m lightning_distnn.testing.cluster_job --out /tmp/w hybrid plan

Writes ``<out>/<case>.rank<r>.pt`` = {"state": this rank's weights (DTensors gathered, a pipeline
stage holds only its layers), "rank", "node", "coords" (dp/pp/tp coordinates), "world"}. The cases
and their single-process references are in :data:`CASES` and :func:`reference`. The case ``plan``
runs ``distnn-plan`` (:data:`PLAN_ARGS`, ``--measure 1``) in the same job, in the process group the
cases before it left (as a user's script would), and rank 0 writes its JSON to ``<out>/plan.json``.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

STEPS, GLOBAL_BATCH = 3, 16
WIDTH = dict(conv_filters=4, fc_width=16, image_size=16)

# case -> (strategy class name in lightning_distnn.strategies, its kwargs, plain SGD?, processes per node)
CASES: dict[str, tuple[str, dict, bool, int]] = {
    "dp": ("DataParallelStrategy", {}, False, 1),
    "ps": ("DataParallelStrategy", {"sync": "parameter_server", "ps_mode": "sync"}, False, 1),
    # averaging the parameters after every plain-SGD step is synchronous SGD (momentum would differ)
    "local_sgd": ("DataParallelStrategy", {"sync": "local_sgd", "local_sgd_period": 1}, True, 1),
    "pipeline": ("PipelineStrategy", {"schedule": "1f1b", "microbatches": 4, "partition": "uniform"}, False, 1),
    "tp": ("TensorParallelStrategy", {}, False, 1),
    # 2 nodes x 2 processes: the mesh is (dp, pp, tp), so pp pairs the two processes of a node
    # and dp runs across the nodes
    "hybrid": ("HybridStrategy", {"dp": 2, "pp": 2, "tp": 1, "microbatches": 2, "partition": "uniform"}, False, 2),
}


# distnn-plan in the job: a tiny network, one measured layout, one measured step
PLAN_ARGS = ["--global-batch", "16", "--conv-layers", "2", "--conv-filters", "4", "--fc-layers", "1",
             "--fc-width", "16", "--image-size", "8", "--repeats", "1", "--no-cache", "--max-microbatches", "4",
             "--measure", "1", "--steps", "1", "--json"]


def run_plan(out: Path) -> None:
    """``distnn-plan`` under this torchrun job, as a user runs it on a real cluster; rank 0 keeps its JSON."""
    import contextlib
    import io

    from lightning_distnn.planner.cli import main as plan_main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = plan_main(["--world-size", os.environ["WORLD_SIZE"], *PLAN_ARGS])
    if code != 0:
        raise RuntimeError(f"distnn-plan exited with {code}: {text.getvalue()[-2000:]}")
    if int(os.environ["RANK"]) == 0:
        (out / "plan.json").write_text(text.getvalue())


def make_module(plain_sgd: bool):
    from lightning_distnn.testing.equivalence import tiny_classifier

    module = tiny_classifier(seed=0, **WIDTH)
    if plain_sgd:
        module.optimizer_factory = partial(torch.optim.SGD, lr=0.1)
    return module


def data():
    from lightning_distnn.testing.equivalence import digits_tensors

    return digits_tensors(STEPS * GLOBAL_BATCH, image_size=WIDTH["image_size"])


def reference(case: str) -> dict[str, torch.Tensor]:
    """The single-process weights ``case`` must reproduce (a deep copy trained on the sampler's order)."""
    from lightning_distnn.testing.equivalence import reference_train

    x, y = data()
    return reference_train(make_module(CASES[case][2]), x, y, GLOBAL_BATCH, STEPS)


def _dp_degree(strategy, world: int) -> int:
    kwargs = strategy.distributed_sampler_kwargs or {}
    return int(kwargs.get("num_replicas", world))


def _local_state(module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in module.net.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = value.detach().cpu().clone()
    return out


def run_case(case: str, out: Path) -> None:
    import lightning_distnn.strategies as strategies
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    cls_name, kwargs, plain, _ = CASES[case]
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    strategy = getattr(strategies, cls_name)(timeout=60, **kwargs)
    module = make_module(plain)
    x, y = data()
    # the global batch is the reference's; each data-parallel replica takes its share
    dp = kwargs.get("dp", world if cls_name in ("DataParallelStrategy",) else 1)
    trainer = quiet_trainer(strategy, devices=local, num_nodes=world // local, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // dp))
    if _dp_degree(trainer.strategy, world) != dp:
        raise RuntimeError(f"{case}: the sampler has {_dp_degree(trainer.strategy, world)} replicas, expected {dp}")
    dims = getattr(trainer.strategy, "parallel_dims", None)
    rank = trainer.global_rank
    record = {
        "state": _local_state(module),
        "rank": rank,
        "node": int(os.environ.get("GROUP_RANK", trainer.node_rank)),
        "coords": dims.coordinates(rank) if dims is not None and hasattr(dims, "coordinates") else None,
        "world": trainer.world_size,
        "steps": trainer.global_step,
        "interface": os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    torch.save(record, out / f"{case}.rank{rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for <case>.rank<r>.pt")
    p.add_argument("cases", nargs="+", choices=[*CASES, "plan"])
    args = p.parse_args()
    torch.set_num_threads(1)
    import lightning_distnn  # noqa: F401  (registers the strategies)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        if case == "plan":
            run_plan(out)
        else:
            run_case(case, out)


if __name__ == "__main__":
    main()
