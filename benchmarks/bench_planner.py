"""Planner acceptance benchmark: does the planner choose the layout that measures fastest, and how far off are its predictions?

One machine, CPU, gloo::

    python benchmarks/bench_planner.py --grid reduced                       # a few scenarios
    python benchmarks/bench_planner.py --grid full --rounds 2 --out benchmarks/results/planner.json \\
        --plot benchmarks/results/planner_scatter.png
    python benchmarks/bench_planner.py --grid none --seed-scenario          # the seed's case study, 10 processes
    python benchmarks/bench_planner.py --fresh-memory RUN.json --out RUN_memory.json   # every layout's peak, alone

For every scenario (model, global batch, world size) the planner profiles the network in the
scenario's processes, measures the links, and ranks every layout; then its top ``--top`` layouts
plus the best data-only, pipeline-only and tensor-only layouts are trained for a few steps each
with ``lightning.Trainer``, interleaved (``--rounds``). Reported per scenario: the chosen layout and
its measured images/s, the best measured layout and its images/s, regret = best/chosen - 1, and
the prediction error |predicted - measured| / measured of every measured layout; predicted memory
beside the heap's peak. Where the chosen layout is not the fastest measured, the two are measured
again head to head (``--confirm`` rounds, fresh processes) and ``head to head`` = max(0, chosen /
best - 1) on those samples alone: the regret without the winner's curse (the fastest of several
noisy measurements is luckier, on average, than its layout is fast).

Calibration (``T_0``, the framework's time per step and per pipeline action, which no layer
profile sees) is fitted on the first scenario of each world size and reused, out of sample, for
the others; the first scenario's errors are in-sample and flagged ``*``.

Scenarios on 2 simulated nodes at two link speeds need the simulated cluster
(``lightning_distnn.testing.cluster``); where it is missing they are listed as skipped.
Timings are never asserted; this machine's noise is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

# one thread per rank, as everywhere on this machine; every process of the grid inherits it (a shell without it
# ran two threads per rank on two cores: the planner modelled the oversubscription, the steps swung 10x)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_distnn.planner import Calibration, plan_layout, search  # noqa: E402
from lightning_distnn.planner.cli import build_network  # noqa: E402
from lightning_distnn.planner.measure import fit_calibration, measure_layouts  # noqa: E402
from lightning_distnn.planner.search import format_table  # noqa: E402


@dataclass
class Scenario:
    name: str
    model: dict
    world: int
    global_batch: int
    nodes: int = 1
    link_mbit: float = 0.0  # 0: the machine's own loopback
    image_size: int = 32
    skip: str = ""


def _cnn(filters: int, width: int) -> dict:
    return {"model": "case_study", "conv_filters": filters, "fc_width": width}


SEED_NET = {"model": "seed_net"}
RESNET = {"model": "resnet", "resnet_width": 8}
LINKS_MBIT = (1000.0, 100.0)


def grid(name: str) -> list[Scenario]:
    """``full``: 2 CNN widths + the small ResNet x batches 32, 128 x worlds 2, 4 x (1 node, 2 nodes at 1 Gbit/s and
    100 Mbit/s) = 36 scenarios; ``core``: one node and 2 nodes at 100 Mbit/s, batch 32 = 12; ``reduced``: 4."""
    if name == "none":
        return []
    if name == "reduced":
        return [
            Scenario("cnn16 b32 w2", _cnn(16, 64), 2, 32),
            Scenario("cnn16 b32 w4", _cnn(16, 64), 4, 32),
            Scenario("resnet8 b32 w2", RESNET, 2, 32),
            Scenario("cnn64 b128 w4", _cnn(64, 256), 4, 128),
        ]
    batches = (32, 128) if name == "full" else (32,)
    links = LINKS_MBIT if name == "full" else LINKS_MBIT[1:]
    out = []
    for world in (2, 4):
        for model_name, model in (("cnn16", _cnn(16, 64)), ("cnn64", _cnn(64, 256)), ("resnet8", RESNET)):
            for batch in batches:
                out.append(Scenario(f"{model_name} b{batch} w{world}", model, world, batch))
                for mbit in links:
                    out.append(Scenario(f"{model_name} b{batch} w{world} 2 nodes {mbit:g} Mbit/s", model, world, batch,
                                        nodes=2, link_mbit=mbit))
    return out


def _cluster_missing() -> str:
    try:
        from lightning_distnn.testing.cluster import unsupported_reason
    except ImportError:
        return "simulated cluster (lightning_distnn.testing.cluster) not available in this checkout"
    return unsupported_reason() or ""


def _factory_kwargs(sc: Scenario) -> dict:
    kwargs = dict(sc.model)
    if kwargs["model"] == "case_study":
        kwargs["image_size"] = sc.image_size
    return kwargs


def _measure_cluster(sc: Scenario, args, calibration: Calibration) -> tuple:
    """Plan and measure ``sc`` on 2 simulated nodes: every node runs this file's ``--worker`` under torchrun."""
    import tempfile

    from lightning_distnn.testing.cluster import SimulatedCluster

    out = tempfile.mkdtemp(prefix="bench_planner_")
    job = {"scenario": asdict(sc), "calibration": asdict(calibration), "top": args.top, "steps": args.steps,
           "rounds": args.rounds, "repeats": args.repeats, "max_microbatches": args.max_microbatches,
           "confirm": args.confirm,
           "out": os.path.join(out, "result.json")}
    path = os.path.join(out, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with SimulatedCluster(nodes=sc.nodes, link=f"{sc.link_mbit:g}mbit", procs_per_node=sc.world // sc.nodes) as cluster:
        cluster.run([os.path.abspath(__file__), "--worker", path], env=env, timeout=args.scenario_timeout, cwd=root)
    with open(job["out"]) as f:
        return json.load(f)


def worker(path: str) -> int:
    """One rank of a simulated-cluster scenario (run by torchrun on every node): plan in the processes, then measure."""
    import torch.distributed as dist

    from lightning_distnn.planner.measure import measure_layouts_in_group

    job = json.load(open(path))
    sc = Scenario(**job["scenario"])
    fk = _factory_kwargs(sc)
    per_node = sc.world // sc.nodes
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = build_network(**fk)
    plan = plan_layout(net, torch.randn(1, 3, sc.image_size, sc.image_size), world_size=sc.world,
                       global_batch=sc.global_batch, cache_dir=None, repeats=job["repeats"], ranks_per_node=per_node,
                       calibration=Calibration(**job["calibration"]), max_microbatches=job["max_microbatches"])
    chosen = candidates(plan, job["top"])
    # Lightning trains on this same group: under torchrun a destroyed and re-made default group reads the old
    # one's addresses from the launcher's store and node 1 cannot connect (measure_layouts_in_group says why)
    measured = measure_layouts_in_group([e.layout for e in chosen], build_network, fk,
                                        (3, sc.image_size, sc.image_size), global_batch=sc.global_batch,
                                        steps=job["steps"], rounds=job["rounds"])
    pair = head_to_head_pair(plan.best.layout, chosen, measured)  # the same on every rank: measured is gathered
    again = {}
    if pair and job["confirm"]:
        again = measure_layouts_in_group(pair, build_network, fk, (3, sc.image_size, sc.image_size),
                                         global_batch=sc.global_batch, steps=job["steps"], rounds=job["confirm"])
    if rank == 0:
        with open(job["out"], "w") as f:
            json.dump({"profile": plan.profile.to_dict(), "network": plan.network.to_dict(),
                       "layouts": [asdict(e.layout) for e in chosen], "measured": measured,
                       "head_to_head": again}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def head_to_head_pair(choice, estimates: list, measured: dict) -> list:
    """The planner's choice and the layout that measured fastest, when they differ (else ``[]``): measured again,
    alone and interleaved, they give a regret free of the winner's curse (the fastest of several noisy
    measurements is, on average, luckier than its layout is fast)."""
    if choice.label not in measured:
        return []
    best = min(measured, key=lambda label: measured[label]["step_s"])
    if best == choice.label:
        return []
    return [choice] + [e.layout for e in estimates if e.layout.label == best]


def candidates(plan, top: int) -> list:
    """Top ``top`` layouts, then the best data-only, pipeline-only and tensor-only layouts (no duplicates)."""
    chosen = [e for e in plan.ranked[:top]]
    for match in ({"pp": 1, "tp": 1}, {"dp": 1, "tp": 1}, {"dp": 1, "pp": 1}):
        pure = [e for e in plan.ranked if all(getattr(e.layout, k) == v for k, v in match.items())
                and (e.layout.dp > 1 or e.layout.pp > 1 or e.layout.tp > 1)]
        if pure and pure[0] not in chosen:
            chosen.append(pure[0])
    return chosen


def run_cluster_scenario(sc: Scenario, args, calibration: Calibration) -> dict:
    from lightning_distnn.planner import ModelProfile, Network
    from lightning_distnn.planner.cost import Layout

    t0 = time.perf_counter()
    data = _measure_cluster(sc, args, calibration)
    profile, network = ModelProfile.from_dict(data["profile"]), Network.from_dict(data["network"])
    plan = search(profile, network, world_size=sc.world, global_batch=sc.global_batch, calibration=calibration,
                  max_microbatches=args.max_microbatches)
    by_label = {e.layout.label: e for e in plan.ranked}
    chosen = [by_label[Layout(**{**d, "partition": tuple(d["partition"])}).label] for d in data["layouts"]]
    return _report(sc, plan, chosen, data["measured"], time.perf_counter() - t0, calibration, None, args.rounds,
                   data.get("head_to_head") or {})


def run_scenario(sc: Scenario, args, calibration: Calibration | None) -> dict:
    if sc.nodes > 1:
        return run_cluster_scenario(sc, args, calibration or Calibration())
    fk = _factory_kwargs(sc)
    torch.manual_seed(0)
    net = build_network(**fk)
    x = torch.randn(1, 3, sc.image_size, sc.image_size)
    t0 = time.perf_counter()
    plan = plan_layout(net, x, world_size=sc.world, global_batch=sc.global_batch, processes=sc.world,
                       factory=build_network, factory_kwargs=fk, cache_dir=args.cache_dir, repeats=args.repeats,
                       calibration=calibration or Calibration(), max_microbatches=args.max_microbatches)
    plan_s = time.perf_counter() - t0
    chosen = candidates(plan, args.top)
    measured = measure_layouts([e.layout for e in chosen], build_network, fk, (3, sc.image_size, sc.image_size),
                               global_batch=sc.global_batch, steps=args.steps, rounds=args.rounds)
    fitted = None
    if calibration is None:  # the first scenario of its world size: fit T_0 here, re-plan with it (in sample)
        fitted = fit_calibration(chosen, [measured[e.layout.label]["step_s"] for e in chosen])
        plan = search(plan.profile, plan.network, world_size=sc.world, global_batch=sc.global_batch,
                      calibration=fitted, max_microbatches=args.max_microbatches)
        by_label = {e.layout.label: e for e in plan.ranked}
        chosen = [by_label[e.layout.label] for e in chosen if e.layout.label in by_label]
        if plan.best.layout.label not in measured:  # the calibrated choice must be measured too
            extra = measure_layouts([plan.best.layout], build_network, fk, (3, sc.image_size, sc.image_size),
                                    global_batch=sc.global_batch, steps=args.steps, rounds=args.rounds)
            measured.update(extra)
            chosen.append(plan.best)
    pair = head_to_head_pair(plan.best.layout, chosen, measured)
    again = {}
    if pair and args.confirm:
        again = measure_layouts(pair, build_network, fk, (3, sc.image_size, sc.image_size),
                                global_batch=sc.global_batch, steps=args.steps, rounds=args.confirm)
    return _report(sc, plan, chosen, measured, plan_s, calibration, fitted, args.rounds, again)


def _report(sc: Scenario, plan, chosen: list, measured: dict, plan_s: float, calibration, fitted,
            rounds: int = 1, again: dict | None = None) -> dict:
    rows = []
    for e in chosen:
        m = measured[e.layout.label]
        rows.append({
            "layout": e.layout.label, "predicted_s": e.step_s, "measured_s": m["step_s"],
            "error": abs(e.step_s - m["step_s"]) / m["step_s"],
            "predicted_mem": e.memory_bytes, "measured_mem": m.get("peak_heap_bytes", float("nan")),
            "rss_mem": m["peak_rss_bytes"], "cores_factor": e.features.get("cores_factor", 1.0),
            "samples": m.get("samples", []),
        })
    best = min(rows, key=lambda r: r["measured_s"])
    pick = next((r for r in rows if r["layout"] == plan.best.layout.label), None)
    if pick is None:  # the re-planned choice was not among the measured layouts: no regret can be given
        pick = {"layout": plan.best.layout.label, "measured_s": float("nan")}
    return {
        "scenario": asdict(sc), "plan_s": plan_s, "in_sample": calibration is None, "rounds": rounds,
        "load": os.getloadavg(),
        "calibration": asdict(fitted or calibration), "network": plan.network.to_dict(),
        "chosen": pick["layout"], "chosen_ips": sc.global_batch / pick["measured_s"],
        "best": best["layout"], "best_ips": sc.global_batch / best["measured_s"],
        "regret": None if math.isnan(pick["measured_s"]) else pick["measured_s"] / best["measured_s"] - 1,
        "head_to_head": head_to_head(pick, best, again or {}),
        "layouts": rows, "winner_terms": {t.symbol: t.value for t in plan.best.terms},
    }


def head_to_head(pick: dict, best: dict, again: dict) -> dict:
    """The regret measured again on the pair alone (``again``: label -> summary): ``regret`` = max(0, chosen /
    best - 1) on the new samples; 0 when the choice already measured fastest; ``None`` when not re-measured."""
    if math.isnan(pick["measured_s"]):
        return {"regret": None}
    if pick["layout"] == best["layout"]:
        return {"regret": 0.0}
    if pick["layout"] not in again or best["layout"] not in again:
        return {"regret": None}
    c, b = again[pick["layout"]]["step_s"], again[best["layout"]]["step_s"]
    return {"regret": max(0.0, c / b - 1), "chosen_s": c, "best_s": b,
            "chosen_samples": again[pick["layout"]].get("samples", []),
            "best_samples": again[best["layout"]].get("samples", [])}


def seed_scenario(args) -> dict:
    """The seed's case study at full width: data over 10, model over 5 (5 processes), hybrid 2 x 5, the planner's choice."""
    fk = {"model": "case_study"}
    torch.manual_seed(0)
    net = build_network(**fk)
    x = torch.randn(1, 3, 32, 32)
    batch = args.seed_batch
    plan = plan_layout(net, x, world_size=10, global_batch=batch, processes=10, factory=build_network,
                       factory_kwargs=fk, cache_dir=args.cache_dir, repeats=1, microbatch_sizes=(1, 2, 4),
                       max_microbatches=args.max_microbatches)
    wanted = [("data over 10", plan.find(dp=10, pp=1, tp=1, sync="allreduce", compression="none")),
              ("hybrid 2 x 5", plan.find(dp=2, pp=5, tp=1, compression="none")),
              ("planner's choice", plan.best)]
    layouts = []
    for _, est in wanted:
        if est is not None and est.layout not in layouts:
            layouts.append(est.layout)
    measured = measure_layouts(layouts, build_network, fk, (3, 32, 32), global_batch=batch, steps=args.seed_steps)
    five = search(plan.profile, plan.network, world_size=5, global_batch=batch, max_microbatches=args.max_microbatches)
    pp5 = five.find(dp=1, pp=5, tp=1)
    measured5 = measure_layouts([pp5.layout], build_network, fk, (3, 32, 32), global_batch=batch, steps=args.seed_steps)
    rows = []
    for what, est, meas in [(w, e, measured) for w, e in wanted if e is not None] + [("model over 5 (5 processes)", pp5, measured5)]:
        m = meas[est.layout.label]
        rows.append({"what": what, "layout": est.layout.label, "predicted images/s": est.images_per_s,
                     "measured images/s": batch / m["step_s"],
                     "error": abs(est.step_s - m["step_s"]) / m["step_s"],
                     "predicted MB/rank": est.memory_bytes / 1e6, "measured RSS growth MB": m["peak_rss_bytes"] / 1e6})
    return {"global_batch": batch, "rows": rows, "winner": plan.best.seed_form()}


def reanalyze(path: str, args) -> list[dict]:
    """Re-predict a finished run's measured layouts from its cached profiles with today's calibration rule.

    Nothing is measured again: the measured step times and links are the run's; the profiles come from the
    cache (or are measured here, on one node). ``T_0`` is refitted on the
    first scenario of each world size (in sample, ``*``) and used for the others; a chosen layout the
    run did not measure has no regret (``None``).
    """
    old = json.load(open(path))["results"]
    out, calibrations = [], {}
    for r in old:
        sc = Scenario(**r["scenario"])
        fk = _factory_kwargs(sc)
        torch.manual_seed(0)
        net = build_network(**fk)
        x = torch.randn(1, 3, sc.image_size, sc.image_size)
        plan = plan_layout(net, x, world_size=sc.world, global_batch=sc.global_batch, processes=sc.world,
                           factory=build_network, factory_kwargs=fk, cache_dir=args.cache_dir, repeats=args.repeats,
                           calibration=Calibration(), max_microbatches=args.max_microbatches)
        profile, network = plan.profile, plan.network
        if r.get("network"):  # the links the run measured (2 simulated nodes: not this machine's loopback)
            from lightning_distnn.planner import Network

            network = Network.from_dict(r["network"])
            plan = search(profile, network, world_size=sc.world, global_batch=sc.global_batch,
                          max_microbatches=args.max_microbatches)
        measured = {row["layout"]: row for row in r["layouts"]}
        raw = {e.layout.label: e for e in plan.ranked + plan.refused}
        in_sample = sc.world not in calibrations
        if in_sample:
            labels = [k for k in measured if k in raw]
            calibrations[sc.world] = fit_calibration([raw[k] for k in labels], [measured[k]["measured_s"] for k in labels])
        cal = calibrations[sc.world]
        plan = search(profile, network, world_size=sc.world, global_batch=sc.global_batch, calibration=cal,
                      max_microbatches=args.max_microbatches)
        est = {e.layout.label: e for e in plan.ranked}
        rows = [{**row, "predicted_s": est[k].step_s, "error": abs(est[k].step_s - row["measured_s"]) / row["measured_s"],
                 "predicted_mem": est[k].memory_bytes} for k, row in measured.items() if k in est]
        best = min(rows, key=lambda row: row["measured_s"])
        chosen = plan.best.layout.label
        pick = measured.get(chosen)
        out.append({
            "scenario": r["scenario"], "in_sample": in_sample, "calibration": asdict(cal),
            "chosen": chosen, "chosen_ips": sc.global_batch / pick["measured_s"] if pick else None,
            "best": best["layout"], "best_ips": sc.global_batch / best["measured_s"],
            "regret": pick["measured_s"] / best["measured_s"] - 1 if pick else None, "layouts": rows,
        })
    return out


def fresh_memory(path: str, args) -> dict:
    """Every measured layout of a finished run, its heap peak measured again alone, in fresh processes on one node,
    beside the memory today's model predicts for it.

    Why: the grid trains all of a scenario's layouts one after another in the same processes, and a layout's heap
    peak there can include what the layouts before it left behind (seen: tensor-parallel and 4-rank layouts 17-29%
    over their peak measured alone). Memory does not depend on the links, so a 2-node scenario's layouts are
    measured on one node; a layout met in several scenarios (same model, batch, world) is measured once.
    """
    data = json.load(open(path))
    done: dict = {}
    for r in data["results"]:
        sc = Scenario(**r["scenario"])
        fk = _factory_kwargs(sc)
        torch.manual_seed(0)
        plan = plan_layout(build_network(**fk), torch.randn(1, 3, sc.image_size, sc.image_size), world_size=sc.world,
                           global_batch=sc.global_batch, processes=sc.world, factory=build_network, factory_kwargs=fk,
                           cache_dir=args.cache_dir, repeats=args.repeats, max_microbatches=args.max_microbatches)
        est = {e.layout.label: e for e in plan.ranked + plan.refused}
        for row in r["layouts"]:
            if row["layout"] not in est:
                continue
            key = (json.dumps(fk, sort_keys=True), sc.global_batch, row["layout"])
            if key not in done:
                alone = measure_layouts([est[row["layout"]].layout], build_network, fk,
                                        (3, sc.image_size, sc.image_size), global_batch=sc.global_batch, steps=1)
                done[key] = alone[row["layout"]]["peak_heap_bytes"]
                print(f"{sc.name}: {row['layout']}: predicted {est[row['layout']].memory_bytes / 1e6:.4g} MB, alone "
                      f"{done[key] / 1e6:.4g} MB, in the grid {row['measured_mem'] / 1e6:.4g} MB", flush=True)
            row["fresh_mem"], row["predicted_mem_now"] = done[key], est[row["layout"]].memory_bytes
    rows = [row for r in data["results"] for row in r["layouts"] if row.get("fresh_mem", 0) > 0]
    errors = [abs(row["predicted_mem_now"] - row["fresh_mem"]) / row["fresh_mem"] for row in rows]
    grid = [abs(row["predicted_mem_now"] - row["measured_mem"]) / row["measured_mem"] for row in rows
            if row["measured_mem"] and row["measured_mem"] > 0]
    data["fresh_memory"] = {
        "layouts": len(rows), "measured alone": len(done),
        "median memory error (alone)": statistics.median(errors) if errors else float("nan"),
        "memory within 15% (alone)": sum(e <= 0.15 for e in errors) / len(errors) if errors else float("nan"),
        "max memory error (alone)": max(errors) if errors else float("nan"),
        "median memory error (in the grid, today's model)": statistics.median(grid) if grid else float("nan"),
        "memory within 15% (in the grid, today's model)": sum(e <= 0.15 for e in grid) / len(grid) if grid else float("nan"),
    }
    return data


def round_spread(samples: list[float], rounds: int) -> float:
    """How far apart the rounds' medians of one layout are (max / min - 1): the noise between measurements of the
    same layout minutes apart, against which a regret can be read. NaN with one round."""
    if rounds < 2 or len(samples) < rounds:
        return float("nan")
    per = len(samples) // rounds
    medians = [statistics.median(samples[i * per:(i + 1) * per]) for i in range(rounds)]
    return max(medians) / min(medians) - 1


def noise(result: dict) -> float:
    """A scenario's measurement noise: the median round spread over its measured layouts."""
    rounds = result.get("rounds", 1)
    spreads = [round_spread(row.get("samples", []), rounds) for row in result["layouts"]]
    spreads = [x for x in spreads if x == x]
    return statistics.median(spreads) if spreads else float("nan")


def scenario_rows(results: list[dict]) -> list[dict]:
    """One row per scenario: chosen and best layouts, regret, errors, the load average while it ran."""
    return [{"scenario": r["scenario"]["name"] + (" *" if r["in_sample"] else ""), "chosen": r["chosen"],
             "chosen img/s": r["chosen_ips"], "best measured": r["best"], "best img/s": r["best_ips"],
             "regret": r["regret"] if r["regret"] is not None else "n/a",
             "head to head": _h2h(r) if _h2h(r) is not None else "n/a",
             "noise": noise(r),
             "median error": statistics.median(row["error"] for row in r["layouts"]),
             "max error": max(row["error"] for row in r["layouts"]),
             "median mem error": statistics.median(abs(row["predicted_mem"] - row["measured_mem"]) / row["measured_mem"]
                                                   for row in r["layouts"]),
             "load": f"{r['load'][0]:.0f}" if r.get("load") else ""} for r in results]


def _h2h(result: dict):
    return (result.get("head_to_head") or {}).get("regret")


def summarize(results: list[dict]) -> dict:
    regrets = [r["regret"] for r in results if r["regret"] is not None]
    confirmed = [_h2h(r) for r in results if _h2h(r) is not None]
    errors = sorted(row["error"] for r in results for row in r["layouts"])
    oos = sorted(row["error"] for r in results if not r["in_sample"] for row in r["layouts"])

    def pct(values, q):
        return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] if values else float("nan")

    mem = [abs(row["predicted_mem"] - row["measured_mem"]) / row["measured_mem"] for r in results for row in r["layouts"]
           if row["measured_mem"] and row["measured_mem"] == row["measured_mem"] and row["measured_mem"] > 0]
    noises = [noise(r) for r in results if r["regret"] is not None]
    within = [reg <= max(0.05, n) for reg, n in zip(regrets, noises) if n == n]
    return {
        "scenarios": len(results),
        "regret <= 5%": sum(r <= 0.05 for r in regrets) / len(regrets) if regrets else float("nan"),
        "regret <= max(5%, noise)": sum(within) / len(within) if within else float("nan"),
        "max regret": max(regrets) if regrets else float("nan"),
        "regret <= 5%, head to head": sum(r <= 0.05 for r in confirmed) / len(confirmed) if confirmed else float("nan"),
        "max regret, head to head": max(confirmed) if confirmed else float("nan"),
        "median error": statistics.median(errors) if errors else float("nan"),
        "p90 error": pct(errors, 0.9),
        "median error (out of sample)": statistics.median(oos) if oos else float("nan"),
        "p90 error (out of sample)": pct(oos, 0.9),
        "median memory error": statistics.median(mem) if mem else float("nan"),
        "memory within 15%": sum(e <= 0.15 for e in mem) / len(mem) if mem else float("nan"),
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for r in results:
        xs = [row["measured_s"] * 1e3 for row in r["layouts"]]
        ys = [row["predicted_s"] * 1e3 for row in r["layouts"]]
        ax.scatter(xs, ys, s=14, label=r["scenario"]["name"] + (" *" if r["in_sample"] else ""))
    lo = min(min(row["measured_s"], row["predicted_s"]) for r in results for row in r["layouts"]) * 1e3
    hi = max(max(row["measured_s"], row["predicted_s"]) for r in results for row in r["layouts"]) * 1e3
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("measured ms/step"), ax.set_ylabel("predicted ms/step")
    ax.set_title("planner: predicted vs measured step time")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=("full", "core", "reduced", "none"), default="reduced")
    p.add_argument("--only", default="", help="comma-separated scenario names to run (default: all)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--confirm", type=int, default=3,
                   help="rounds of the head-to-head re-measurement of the choice against the fastest measured (0: none)")
    p.add_argument("--max-microbatches", type=int, default=16)
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), "results", ".planner_cache"))
    p.add_argument("--seed-scenario", action="store_true")
    p.add_argument("--seed-batch", type=int, default=40)
    p.add_argument("--seed-steps", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--reanalyze", default="", help="a finished run's JSON: re-predict its measurements, measure nothing")
    p.add_argument("--scenario-timeout", type=float, default=1800.0, help="seconds per simulated-cluster scenario")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one rank of a cluster scenario
    p.add_argument("--fresh-memory", default="", help="a finished run's JSON: measure every layout's heap peak again, "
                   "alone in fresh processes, beside today's predicted memory (writes --out)")
    p.add_argument("--report", default="", help="a (partial) run's JSON: print its tables and summary, plot; measure nothing")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.fresh_memory:
        data = fresh_memory(args.fresh_memory, args)
        print("\n" + format_table([data["fresh_memory"]]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(data, f, indent=1, default=str)
        return 0
    if args.report:
        results = json.load(open(args.report))["results"]
        print(format_table(scenario_rows(results)))
        print("\n" + format_table([summarize(results)]))
        if args.plot:
            plot(results, args.plot)
        return 0
    if args.reanalyze:
        results = reanalyze(args.reanalyze, args)
        rows = [{"scenario": r["scenario"]["name"] + (" *" if r["in_sample"] else ""), "chosen": r["chosen"],
                 "chosen img/s": r["chosen_ips"] if r["chosen_ips"] else "not measured",
                 "best measured": r["best"], "best img/s": r["best_ips"],
                 "regret": r["regret"] if r["regret"] is not None else "n/a",
                 "median error": statistics.median(row["error"] for row in r["layouts"]),
                 "max error": max(row["error"] for row in r["layouts"])} for r in results]
        print(format_table(rows))
        for r in results:
            print(f"\n{r['scenario']['name']}{' *' if r['in_sample'] else ''}: T_0 fit {r['calibration']}")
            print(format_table([{k: (v * 1e3 if k.endswith("_s") else v / 1e6 if k.endswith("_mem") else v)
                                 for k, v in row.items()} for row in r["layouts"]]))
        summary = summarize(results)
        print("\n" + format_table([summary]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"results": results, "summary": summary, "reanalyzed": args.reanalyze}, f, indent=1, default=str)
        if args.plot:
            plot(results, args.plot)
        return 0
    scenarios = grid(args.grid)
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        scenarios = [s for s in scenarios if s.name in names]
    skipped = []
    for sc in scenarios:
        if sc.nodes > 1:
            sc.skip = _cluster_missing()
            if sc.skip:
                skipped.append(sc)
    results, calibrations = [], {}
    for sc in scenarios:
        if sc.skip:
            continue
        print(f"== {sc.name}", flush=True)
        try:
            result = run_scenario(sc, args, calibrations.get(sc.world))
        except Exception as err:  # one scenario's failure (e.g. a gloo connect timeout) must not end the grid
            lines = [line for line in str(err).splitlines() if "Error" in line and "errors.html" not in line]
            print(f"scenario {sc.name} failed: {type(err).__name__}: " + " | ".join(lines[-4:])[-1500:], flush=True)
            skipped.append(sc)
            sc.skip = f"failed: {type(err).__name__}"
            continue
        if sc.world not in calibrations:
            calibrations[sc.world] = Calibration(**result["calibration"])
        results.append(result)
        print(format_table([{k: (v * 1e3 if k.endswith("_s") else v / 1e6 if k.endswith("_mem") else v)
                             for k, v in row.items()} for row in result["layouts"]]), flush=True)
        print(f"chosen {result['chosen']} ({result['chosen_ips']:.4g} img/s), best {result['best']} "
              f"({result['best_ips']:.4g} img/s), regret {result['regret']}, load {result['load']}", flush=True)
        if args.out:  # after every scenario, so a run stopped early keeps what it measured
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"results": results, "partial": True}, f, indent=1, default=str)
    report: dict = {"results": results, "skipped": [s.name + ": " + s.skip for s in skipped]}
    if results:
        print("\n" + format_table(scenario_rows(results)))
        report["summary"] = summarize(results)
        print("\n" + format_table([report["summary"]]))
        if args.plot:
            plot(results, args.plot)
    if skipped:
        print(f"\nskipped {len(skipped)} scenarios: {skipped[0].skip}")
    if args.seed_scenario:
        print("\n== the seed's case study, full width", flush=True)
        report["seed"] = seed_scenario(args)
        print(format_table(report["seed"]["rows"]))
        print(report["seed"]["winner"])
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
