"""``distnn-cluster``: run a command on N simulated nodes (network namespaces, shaped links) under torchrun.

On one machine, as root::

    distnn-cluster --nodes 2 --procs-per-node 1 --link 100mbit -- distnn-train trainer.num_nodes=2 trainer.devices=1
    distnn-cluster --nodes 2 --procs-per-node 2 --link 1gbit -- python -m lightning_distnn.testing.cluster_job --out /tmp/w hybrid
    distnn-cluster --nodes 2 --link 20mbit --measure     # measure what a link carries
    distnn-cluster --plan --nodes 3                      # print names and addresses, create nothing
    distnn-cluster --cleanup                             # remove namespaces left by dead runs

For ``distnn-train`` the command is checked before anything starts: ``trainer.num_nodes`` must be
``--nodes`` and ``trainer.devices`` must be ``--procs-per-node`` (added when missing), and each node
writes to its own Hydra directory ``<--output-dir>/node<k>`` (metrics.json and the CSV log come from
global rank 0 only). The same ``distnn-train`` line runs on a real cluster under torchrun or SLURM:
see docs/cluster.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from lightning_distnn.testing.cluster import (
    ClusterError,
    SimulatedCluster,
    cleanup_stale,
    format_rate,
    parse_link,
    plan_cluster,
    unsupported_reason,
)


def is_distnn_train(command: Sequence[str]) -> bool:
    """``distnn-train ...`` or ``python -m lightning_distnn.train ...``."""
    if not command:
        return False
    if os.path.basename(command[0]) == "distnn-train":
        return True
    return len(command) >= 3 and command[1] == "-m" and command[2] == "lightning_distnn.train"


def distnn_train_command(command: Sequence[str], *, nodes: int, procs_per_node: int, output_dir: str,
                         node_rank: int) -> list[str]:
    """``command`` with ``trainer.num_nodes``/``trainer.devices`` checked (added when missing) and
    ``hydra.run.dir`` set to this node's own directory (unless given)."""
    command = list(command)
    values = {}
    for arg in command:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep:
            values[key] = value
    expected = {"trainer.num_nodes": nodes, "trainer.devices": procs_per_node}
    flags = {"trainer.num_nodes": "--nodes", "trainer.devices": "--procs-per-node"}
    for key, want in expected.items():
        if key not in values:
            command.append(f"{key}={want}")
            continue
        try:
            given = int(values[key])
        except ValueError:
            given = None
        if given != want:
            raise ValueError(
                f"{key}={values[key]} does not match {flags[key]} {want}: every node runs {procs_per_node} "
                f"process(es) and there are {nodes} nodes. Set {key}={want} or change {flags[key]}."
            )
    if "hydra.run.dir" not in values:
        command.append(f"hydra.run.dir={output_dir}/node{node_rank}")
    return command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnn-cluster", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything after -- is the command each node runs under torchrun.")
    p.add_argument("--nodes", type=int, default=2, help="simulated machines (default 2)")
    p.add_argument("--procs-per-node", type=int, default=1, help="torchrun --nproc-per-node (default 1)")
    p.add_argument("--link", default="unlimited", help="speed of every node's link: 20mbit, 100mbit, 1gbit, unlimited")
    p.add_argument("--subnet", default="10.77.0.0/24", help="private range used only inside the namespaces")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before every node is stopped")
    p.add_argument("--output-dir", default=None, help="distnn-train only: parent of the per-node Hydra directories "
                   "(default outputs/cluster/<run id>)")
    p.add_argument("--measure", action="store_true", help="measure node 0 -> node 1 throughput and exit")
    p.add_argument("--plan", action="store_true", help="print namespaces and addresses, create nothing")
    p.add_argument("--cleanup", action="store_true", help="delete namespaces of dead runs and exit")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        parse_link(args.link)
        plan = plan_cluster(nodes=args.nodes, link=args.link, subnet=args.subnet)
        if args.procs_per_node < 1:
            raise ValueError(f"--procs-per-node {args.procs_per_node} must be at least 1.")
        if args.plan:
            print(plan)
            return 0
        if not (command or args.measure or args.cleanup):
            raise ValueError("no command: put what every node runs after --, e.g. "
                             "distnn-cluster --nodes 2 -- distnn-train trainer.num_nodes=2")
        if args.measure and args.nodes < 2:
            raise ValueError("--measure needs --nodes 2 or more (it sends from node 0 to node 1).")
    except ValueError as err:
        print(f"distnn-cluster: {err}", file=sys.stderr)
        return 2
    reason = unsupported_reason()
    if reason:
        print(f"distnn-cluster: {reason}", file=sys.stderr)
        return 3
    if args.cleanup:
        removed = cleanup_stale()
        print(f"removed {len(removed)} namespace(s) of dead runs" + (f": {', '.join(removed)}" if removed else ""))
        return 0

    cluster = SimulatedCluster(nodes=args.nodes, link=args.link, procs_per_node=args.procs_per_node,
                               subnet=args.subnet, master_port=args.master_port)
    per_node = None
    if is_distnn_train(command):
        output_dir = os.path.abspath(args.output_dir or os.path.join("outputs", "cluster", cluster.plan.run_id))
        try:
            per_node = [distnn_train_command(command, nodes=args.nodes, procs_per_node=args.procs_per_node,
                                             output_dir=output_dir, node_rank=k) for k in range(args.nodes)]
        except ValueError as err:
            print(f"distnn-cluster: {err}", file=sys.stderr)
            return 2
    try:
        with cluster:
            print(cluster.plan, flush=True)
            if args.measure:
                rate = cluster.measure_link(0, 1)
                print(f"node 0 -> node 1: {format_rate(int(rate))} measured, link set to {format_rate(cluster.plan.link)}")
                return 0
            start = time.monotonic()
            results = cluster.run((lambda k: per_node[k]) if per_node else command, timeout=args.timeout,
                                  check=False, stream=True)
            codes = ", ".join(f"node {r.rank}: {r.returncode}" for r in results)
            print(f"[distnn-cluster] finished in {time.monotonic() - start:.1f} s ({codes})", flush=True)
            return 0 if all(r.ok for r in results) else 1
    except KeyboardInterrupt:
        print("[distnn-cluster] interrupted: nodes stopped, namespaces removed", file=sys.stderr)
        return 130
    except ClusterError as err:
        print(f"distnn-cluster: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
