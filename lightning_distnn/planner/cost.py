"""The cost model: the seed's sums, T = sum of T_i (computing) + S = sum of S_i (synchronising), and memory M = sum of M_i.

For a :class:`Layout` (dp x pp x tp, schedule, micro-batches, partition, data-parallel sync and
compression), a global batch ``B`` and a :class:`~lightning_distnn.planner.profile.ModelProfile`,
:func:`predict` returns an :class:`Estimate` whose step time is the sum of these terms (``b = B/dp``
samples per replica, ``m`` micro-batches of ``mu = b/m``; ``c_s`` the time of stage ``s`` for one
micro-batch, ``C_r`` the sum of ``c_s`` over the ``v`` stages rank ``r`` holds, ``r*`` the slowest rank):

* ``T_0`` the framework's own time per step and per pipeline action (:class:`Calibration`, fitted
  from measured steps; zero until calibrated).
* ``T_1`` compute: forward + backward, the pipeline's bubble included:
  ``m * C_r* + (sum_s c_s - C_r*) / v`` over the compute part of each ``c_s``. With equal stages
  that is ``(m + (p-1)/v) c``, i.e. the slowest stage's compute times ``1 / (1 - bubble)``. With
  fewer micro-batches than pipeline ranks the looped schedules gain nothing (``/ 1``, not ``/ v``):
  each of their ``v`` rounds fills and drains alone.
* ``T_2`` optimizer step over the parameters the slowest rank holds.
* ``S_1`` pipeline sends: each micro-batch's activation forward and its gradient back at every
  cut (point-to-point), as far as the compute does not hide them: the schedule's task order
  replayed with the transfers, minus the same replay with free ones (:func:`replayed_transfers`);
  every send on the critical path by the formula of ``T_1`` where the order is not known.
* ``S_2`` tensor-parallel collectives inside every stage (all-reduce / all-gather per sharded pair),
  on the critical path, each with the framework's own time per collective that the links measured
  (``Network.tp_collective_s``: DTensor dispatch, redistribution and sharded optimizer step).
* ``S_3`` data-parallel synchronisation after the backward: a ring all-reduce of the rank's
  gradients over ``dp`` (half the bytes with fp16/bf16), or the parameter server's push and pull.

Memory per rank (the largest over ranks): ``M_1`` parameters, ``M_2`` gradients, ``M_3``
optimizer states (``optimizer_states`` x parameters: 1 for SGD with momentum, 2 for Adam),
``M_4`` activations autograd keeps for the micro-batches in flight (GPipe: ``m``; 1F1B: ``p - r``
on pipeline rank ``r``), ``M_5`` communication buffers (the flat gradient copy of the all-reduce;
the parameter server's copy of the model and its optimizer states, and per remote worker its pushed
gradients and the parameters sent back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lightning_distnn.planner.links import Link, Network
from lightning_distnn.planner.profile import ModelProfile

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
SYNCS = ("allreduce", "parameter_server")
COMPRESSIONS = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class Layout:
    """One way to run the model on ``dp * pp * tp`` processes, as plain data.

    ``partition``: layer counts per pipeline stage (``pp * stages_per_rank`` of them; empty when ``pp == 1``).
    ``schedule`` is ``"none"`` when ``pp == 1``.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    schedule: str = "none"
    microbatches: int = 1
    partition: tuple[int, ...] = ()
    sync: str = "allreduce"
    compression: str = "none"
    stages_per_rank: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank if self.pp > 1 else 1

    @property
    def label(self) -> str:
        axes = [f"{n}{v}" for n, v in (("dp", self.dp), ("pp", self.pp), ("tp", self.tp)) if v > 1] or ["1 process"]
        text = " x ".join(axes)
        if self.pp > 1:
            text += f" {self.schedule} m={self.microbatches} [{','.join(map(str, self.partition))}]"
        if self.sync != "allreduce":
            text += " ps"
        if self.compression != "none":
            text += f" {self.compression}"
        return text

    def stage_ranks(self) -> list[int]:
        """Pipeline rank of every stage, as the pipeline runtime places them (looped: ``s % pp``)."""
        from lightning_distnn.parallel.pipeline.schedules import stage_ranks

        return stage_ranks(self.schedule, self.num_stages, self.pp)


@dataclass(frozen=True)
class Calibration:
    """The framework's own time per step, which no layer profile sees (``T_0``).

    ``step_s``: per training step (Lightning's loop, data loading, metrics, logging, launching
    the collectives); ``action_s``: per pipeline action (a forward or backward of one micro-batch
    on one stage: the schedule's bookkeeping, the send/recv set-up); ``collective_s``: per
    tensor-parallel collective (DTensor dispatch and redistribution beyond the link's latency);
    ``compute_scale``: multiplies the profiled compute (``T_1``, ``T_2``) when the run computes
    faster or slower than the layers did alone. Fitted from measured steps by
    :func:`lightning_distnn.planner.measure.fit_calibration`; neutral until then.
    """

    step_s: float = 0.0
    action_s: float = 0.0
    collective_s: float = 0.0
    compute_scale: float = 1.0
    fitted_on: int = 0

    def seconds(self, layout: "Layout", collectives: float = 0.0) -> float:
        """``T_0`` of a layout whose slowest rank runs ``collectives`` tensor-parallel collectives per step."""
        return self.step_s + self.action_s * actions(layout) + self.collective_s * collectives


def actions(layout: "Layout") -> int:
    """Pipeline actions (F and B per micro-batch per local stage) of one rank per step; 0 without a pipeline."""
    return 2 * layout.microbatches * layout.stages_per_rank if layout.pp > 1 else 0


@dataclass
class Term:
    """One summand of the seed's formulas: symbol (``T_1``, ``S_3``, ``M_4``), what it is, its value."""

    symbol: str
    name: str
    value: float
    formula: str = ""


@dataclass
class Estimate:
    """Predicted step time, throughput, memory and traffic of one layout, with its terms."""

    layout: Layout
    global_batch: int
    step_s: float
    memory_bytes: int
    bytes_per_step: int
    terms: list[Term] = field(default_factory=list)
    memory_terms: list[Term] = field(default_factory=list)
    stage_s: list[float] = field(default_factory=list)
    refused: str = ""
    features: dict[str, float] = field(default_factory=dict)  # uncalibrated parts, for fit_calibration

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.step_s if self.step_s > 0 else math.inf

    def seed_form(self) -> str:
        """The step time and memory written as the seed's sums, with every term's value."""
        t = [x for x in self.terms if x.symbol.startswith("T")]
        s = [x for x in self.terms if x.symbol.startswith("S")]

        def line(total: str, items: list[Term], unit: str, scale: float) -> list[str]:
            head = f"{total} = " + " + ".join(x.symbol for x in items)
            head += " = " + " + ".join(f"{x.value * scale:.4g}" for x in items)
            head += f" = {sum(x.value for x in items) * scale:.4g} {unit}"
            body = [f"  {x.symbol:4} {x.value * scale:10.4g} {unit}  {x.name}" + (f"  [{x.formula}]" if x.formula else "")
                    for x in items]
            return [head] + body

        out = [f"layout {self.layout.label}, global batch {self.global_batch}"]
        out += line("T", t, "ms", 1e3) + line("S", s, "ms", 1e3)
        out.append(f"step = T + S = {self.step_s * 1e3:.4g} ms -> {self.images_per_s:.4g} images/s")
        out += line("M", self.memory_terms, "MB", 1e-6)
        return "\n".join(out)


def check_layout(layout: Layout, profile: ModelProfile, global_batch: int) -> None:
    """Raise ``ValueError`` naming the fix when a layout cannot run this model and batch."""
    L = layout
    for name in ("dp", "pp", "tp", "microbatches", "stages_per_rank"):
        value = getattr(L, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if global_batch % L.dp:
        raise ValueError(f"global batch {global_batch} does not split over dp={L.dp}: use a multiple of {L.dp}.")
    local = global_batch // L.dp
    if local % L.microbatches:
        raise ValueError(f"{local} samples per replica do not split into microbatches={L.microbatches}.")
    if L.sync not in SYNCS or L.compression not in COMPRESSIONS:
        raise ValueError(f"sync={L.sync!r}, compression={L.compression!r}; valid: {SYNCS}, {COMPRESSIONS}.")
    if L.sync == "parameter_server" and (L.pp > 1 or L.tp > 1):
        raise ValueError("sync='parameter_server' needs whole-model replicas: pp=1 and tp=1.")
    if L.tp > 1 and any(L.tp not in layer.tp for layer in profile.layers):
        raise ValueError(f"the profile has no tensor-parallel costs for tp={L.tp}: profile with tp_degrees including {L.tp}.")
    if L.pp == 1:
        if L.schedule != "none" or L.partition:
            raise ValueError("pp=1 has no pipeline: schedule='none' and no partition.")
        return
    if L.schedule not in SCHEDULES:
        raise ValueError(f"schedule={L.schedule!r}; valid: {', '.join(SCHEDULES)}.")
    if (L.schedule == "interleaved_1f1b") != (L.stages_per_rank > 1):
        raise ValueError("interleaved_1f1b holds several stages per rank (stages_per_rank >= 2); gpipe/1f1b hold one.")
    if L.schedule == "1f1b" and L.microbatches < L.pp:
        raise ValueError(f"1f1b needs at least pp={L.pp} micro-batches, got {L.microbatches}.")
    if L.schedule == "interleaved_1f1b" and L.microbatches % max(1, L.microbatches // L.pp):
        raise ValueError(f"interleaved_1f1b runs rounds of {L.pp} micro-batches: m={L.microbatches} does not fit.")
    if len(L.partition) != L.num_stages or sum(L.partition) != profile.num_layers or min(L.partition) < 1:
        raise ValueError(
            f"partition={list(L.partition)} must give {L.num_stages} positive layer counts adding up to "
            f"{profile.num_layers}."
        )


def _stages(layout: Layout, num_layers: int) -> list[list[int]]:
    if layout.pp == 1:
        return [list(range(num_layers))]
    out, start = [], 0
    for count in layout.partition:
        out.append(list(range(start, start + count)))
        start += count
    return out


def _dp_ranks(layout: Layout) -> list[int]:
    return [d * layout.pp * layout.tp for d in range(layout.dp)]


def predict(
    layout: Layout,
    profile: ModelProfile,
    network: Network,
    *,
    global_batch: int,
    optimizer_states: int = 1,
    max_memory_per_rank: Optional[float] = None,
    calibration: Optional[Calibration] = None,
) -> Estimate:
    """Predict one layout (see the module docstring); ``refused`` says why when it is over the memory budget."""
    check_layout(layout, profile, global_batch)
    L, P = layout, profile
    tp, m = L.tp, L.microbatches
    mu = global_batch / L.dp / m
    tp_link = network.link_for(range(tp))
    dp_link = network.link_for(_dp_ranks(L))
    stages = _stages(L, P.num_layers)
    ranks = L.stage_ranks() if L.pp > 1 else [0]

    def cut_link(s: int):
        """The link between stage ``s`` and ``s + 1``: across nodes only where their ranks sit on two nodes."""
        return network.link_for([ranks[s] * tp, ranks[s + 1] * tp])

    def shard(layer) -> float:
        if tp == 1:
            return 1.0
        f = layer.tp[tp].sharded
        return 1 - f + f / tp

    def leaf_scales(layer) -> Optional[list[tuple[float, float]]]:
        """Per leaf of ``layer`` under tp: the share of its input (and what it saves) and of its output one rank
        holds (1/tp where sharded, 1 where replicated); ``None`` without per-leaf data (old profiles)."""
        if tp == 1 or not layer.leaves or len(layer.leaf_saved) != len(layer.leaves):
            return None
        c = layer.tp[tp]
        if not c.sharded_in and c.sharded > 0:  # a profile from before the per-leaf shards were recorded
            return None

        def share(leaf) -> float:
            if leaf.name in c.sharded_in:
                return 1.0 / tp
            inner = [n for n in c.modules if n.startswith(leaf.name + ".")]
            if not inner:
                return 1.0
            # a leaf holding several planned modules (a residual block): their share with a sharded input,
            # each module taken to save about as much
            g = sum(n in c.sharded_in for n in inner) / len(inner)
            return 1 - g + g / tp

        ins = [share(leaf) for leaf in layer.leaves]
        outs = ins[1:] + [1.0 / tp if c.out_sharded else 1.0]
        return list(zip(ins, outs))

    def saved_per_sample(layer) -> float:
        """Bytes one rank saves for the backward per sample: a leaf whose input is sharded saves 1/tp of its
        tensors; the others (a column-wise layer's replicated input, what follows a row-wise all-reduce) all."""
        scales = leaf_scales(layer)
        if scales is None:
            return layer.saved_bytes * shard(layer)
        return sum(sv * f_in for sv, (f_in, _) in zip(layer.leaf_saved, scales))

    compute, p2p, tpcomm, params, saved, inbuf, ncoll, fwd_share = [], [], [], [], [], [], [], []
    for s, layers in enumerate(stages):
        fwd = sum(P.layers[i].time("forward", mu) * shard(P.layers[i]) for i in layers) / P.profile_slowdown
        comp = fwd + sum(P.layers[i].time("backward", mu) * shard(P.layers[i]) for i in layers) / P.profile_slowdown
        fwd_share.append(fwd / comp if comp > 0 else 0.5)
        send = 0.0
        if s < len(stages) - 1:
            send += cut_link(s).p2p(P.layers[layers[-1]].out_bytes * mu)  # activation forward
        if s > 0:
            send += cut_link(s - 1).p2p(P.layers[layers[0] - 1].out_bytes * mu)  # its gradient back
        coll, count = 0.0, 0
        if tp > 1:
            for i in layers:
                c = P.layers[i].tp[tp]
                coll += (c.collectives * (2 * (tp - 1) * tp_link.latency + network.tp_collective_s)
                         + c.bytes_per_sample * mu / tp_link.bandwidth)
                count += c.collectives
            last = P.layers[layers[-1]]
            if last.tp[tp].out_sharded:  # a stage's output is gathered before it is sent
                coll += tp_link.allgather(last.out_bytes * mu, tp)
                count += 1
        ncoll.append(count)
        compute.append(comp)
        p2p.append(send)
        tpcomm.append(coll)
        params.append(sum(P.layers[i].param_bytes * shard(P.layers[i]) for i in layers))
        first = P.layers[layers[0]]  # a stage's first layer holds the input it saves (the layer before is elsewhere)
        first_scales = leaf_scales(first)
        held_input = first.input_shared * (first_scales[0][0] if first_scales else shard(first))
        saved.append((sum(saved_per_sample(P.layers[i]) for i in layers) + held_input) * mu)
        inbuf.append((P.layers[layers[0] - 1].out_bytes if layers[0] > 0 else P.input_bytes) * mu
                     + (P.layers[layers[-1]].out_bytes * mu if L.pp > 1 else 0.0))  # a stage keeps its output for the backward

    # critical path: m * C_r* + (sum_s c_s - C_r*) / v, split over the parts of c_s
    total = [a + b + c for a, b, c in zip(compute, p2p, tpcomm)]
    per_rank = {r: [s for s, rr in enumerate(ranks) if rr == r] for r in set(ranks)}
    slow = max(per_rank, key=lambda r: sum(total[s] for s in per_rank[r]))

    loops = _loop_divisor(L)

    def path(part: Sequence[float]) -> float:
        mine = sum(part[s] for s in per_rank[slow])
        return m * mine + (sum(part) - mine) / loops

    rank_params = {r: sum(params[s] for s in per_rank[r]) for r in per_rank}
    element = P.element_size
    wire = 2 if L.compression in ("fp16", "bf16") else element
    grad_wire = {r: rank_params[r] / element * wire for r in per_rank}
    if L.dp == 1:
        sync_s, sync_name, sync_formula, sync_bytes = 0.0, "data-parallel sync (dp=1: none)", "", 0.0
    elif L.sync == "allreduce":
        sync_s = max(dp_link.allreduce(grad_wire[r], L.dp) for r in per_rank)
        if wire != element:  # the casts and the backend's half-precision sums, per fp32 gradient byte (measured)
            sync_s += network.compress_s_per_byte * max(rank_params.values())
        sync_bytes = max(2 * (L.dp - 1) / L.dp * grad_wire[r] for r in per_rank)
        sync_name = f"data-parallel gradient all-reduce over dp={L.dp}" + (f" ({L.compression})" if wire != element else "")
        sync_formula = "2(dp-1) latency + 2(dp-1)/dp grad bytes / bandwidth" + (
            " + compression s/byte x fp32 grad bytes" if wire != element else "")
    else:
        # one server colocated on rank 0: it receives (dp-1) gradient pushes and sends (dp-1) parameter pulls
        push, pull = grad_wire[0], rank_params[0]
        sync_s = 2 * (L.dp - 1) * dp_link.latency + (L.dp - 1) * (push + pull) / dp_link.bandwidth
        if wire != element:
            sync_s += network.compress_s_per_byte * rank_params[0]
        sync_bytes = (L.dp - 1) * pull
        sync_name = f"parameter server push + pull, {L.dp - 1} workers to 1 server" + (f" ({L.compression})" if wire != element else "")
        sync_formula = "(dp-1) (push + pull bytes) / bandwidth + 2(dp-1) latency" + (
            " + compression s/byte x fp32 grad bytes" if wire != element else "")
    share = shared_cores(L, P, compute, per_rank, rank_params, slow)
    optimizer = share.optimizer
    cal = calibration or Calibration()
    collectives = m * sum(ncoll[s] for s in per_rank[slow])
    scale = cal.compute_scale * share.factor
    sends, sends_formula = path(p2p), "latency + bytes/bandwidth per cut, every send on the critical path"
    if L.pp > 1:
        # the schedule replayed with the transfers (sent in the background, each link one message at a time)
        # against the same replay with free ones: only the transfers the compute does not hide count
        sizes = [P.layers[stages[s][-1]].out_bytes * mu for s in range(len(stages) - 1)]
        task_s = [(scale * c + t) * f for c, t, f in zip(compute, tpcomm, fwd_share)], \
                 [(scale * c + t) * (1 - f) for c, t, f in zip(compute, tpcomm, fwd_share)]
        replayed = replayed_transfers(L, *task_s, [cut_link(s) for s in range(len(stages) - 1)], sizes)
        if replayed is not None:
            sends = replayed
            sends_formula = ("schedule replayed with latency + bytes/bandwidth per cut (sends in the background) "
                             "- replayed with free transfers")
    terms = [
        Term("T_0", "framework per step (loop, data, logging) + per pipeline action / tp collective",
             cal.seconds(L, collectives),
             f"{cal.step_s * 1e3:.3g} ms + {cal.action_s * 1e3:.3g} ms x {actions(L)} actions + "
             f"{cal.collective_s * 1e3:.3g} ms x {collectives} collectives" + ("" if cal.fitted_on else " (not calibrated)")),
        Term("T_1", "forward + backward, pipeline bubble included" + (", cores shared" if share.factor > 1 else ""),
             scale * share.path_compute,
             ("m C_r* + (sum_s c_s - C_r*)/v" if L.pp > 1 else "b samples through all layers")
             + share.formula + (f", x {cal.compute_scale:.3g} (calibrated)" if cal.compute_scale != 1.0 else "")),
        Term("T_2", "optimizer step", scale * optimizer,
             "seconds/parameter x parameters on the slowest rank" + (f", x {share.factor:.3g} shared cores" if share.factor > 1 else "")),
        Term("S_1", "pipeline activations + gradients per micro-batch, not hidden by compute", sends, sends_formula),
        Term("S_2", f"tensor-parallel collectives over tp={tp}" if tp > 1 else "tensor-parallel collectives (tp=1: none)",
             path(tpcomm), ("per sharded pair, ring" + (f", + {network.tp_collective_s * 1e3:.2g} ms framework per collective"
                                                        if network.tp_collective_s else "")) if tp > 1 else ""),
        Term("S_3", sync_name, sync_s, sync_formula),
    ]
    step = sum(t.value for t in terms)

    # memory per rank: the largest over pipeline ranks (dp and tp peers hold the same amounts)
    def transient(layers: list[int]) -> float:
        """How far one micro-batch's backward over ``layers`` rises above holding all its saved activations.

        Sweeping the leaves from the last: at leaf ``k`` the saved tensors of the leaves before it and
        its own are alive, with the gradient of its output and of its input (none for the network's
        first leaf). Without leaf data, layers stand for leaves.
        """
        items = []  # (saved, out, in) bytes per sample on one rank, in execution order
        for i in layers:
            layer = P.layers[i]
            scales = leaf_scales(layer)
            if layer.leaves and len(layer.leaf_saved) == len(layer.leaves):
                scales = scales or [(scale_tp, scale_tp)] * len(layer.leaves)
                items += [(sv * f_in, lf.out_numel * element * f_out, lf.in_numel * element * f_in)
                          for lf, sv, (f_in, f_out) in zip(layer.leaves, layer.leaf_saved, scales)]
            else:
                items.append((layer.saved_bytes * scale_tp, layer.out_bytes * scale_tp,
                              (P.layers[i - 1].out_bytes if i > 0 else P.input_bytes) * scale_tp))
        if layers and layers[0] == 0 and items:
            items[0] = (items[0][0], items[0][1], 0)
        total = sum(sv for sv, _, _ in items)
        peak, before = 0.0, total
        for sv, out, inp in reversed(items):
            before -= sv
            peak = max(peak, before + sv + out + inp)
        return max(0.0, peak - total) * mu

    scale_tp = 1.0 / tp if tp > 1 else 1.0  # sharded leaves: their activations and gradients split over tp (roughly)
    best: Optional[list[Term]] = None
    for r in per_rank:
        weights = rank_params[r]
        counts = in_flight(L, r, {s: saved[s] + inbuf[s] for s in per_rank[r]})
        acts = sum((saved[s] + inbuf[s]) * counts[s] for s in per_rank[r])
        grads_alive = max(transient(stages[s]) for s in per_rank[r])
        buffers = grad_wire[r] if L.dp > 1 and L.sync == "allreduce" else 0.0
        states = optimizer_states * weights
        if L.dp > 1 and L.sync == "parameter_server":
            states = 0.0  # a worker's optimizer never steps: the server applies it
            # the server, colocated on rank 0: its parameters and optimizer states, and per remote worker the
            # gradients it pushed and the parameters sent back to it (sync mode holds all of them at once)
            buffers = (1 + optimizer_states) * weights + (L.dp - 1) * (grad_wire[r] + weights)
        memory_terms = [
            Term("M_1", "parameters", weights),
            Term("M_2", "gradients", weights),
            Term("M_3", f"optimizer states ({optimizer_states} per parameter)"
                 + (", on the server (M_5)" if L.dp > 1 and L.sync == "parameter_server" else ""), states),
            Term("M_4", "activations kept for backward, micro-batches in flight", acts),
            Term("M_5", "communication buffers", buffers),
            Term("M_6", "backward peak above M_4 (a leaf's output and input gradients, one micro-batch)", grads_alive),
        ]
        if best is None or sum(t.value for t in memory_terms) > sum(t.value for t in best):
            best = memory_terms
    memory = int(sum(t.value for t in best))
    local = global_batch / L.dp
    p2p_sent = p2p_bytes(L, P, stages, mu)
    traffic = sync_bytes + max(
        m * sum(p2p_sent[s] for s in per_rank[r])
        + (sum(P.layers[i].tp[tp].bytes_per_sample for s in per_rank[r] for i in stages[s]) * local if tp > 1 else 0.0)
        for r in per_rank
    )
    features = {"actions": float(actions(L)), "collectives": float(collectives),
                "compute": share.factor * (share.path_compute + optimizer), "cores_factor": share.factor,
                "busy_min": min(share.busy), "busy_max": max(share.busy), "comm": sum(t.value for t in terms if t.symbol.startswith("S"))}
    estimate = Estimate(layout=L, global_batch=global_batch, step_s=step, memory_bytes=memory,
                        bytes_per_step=int(traffic), terms=terms, memory_terms=best, stage_s=total, features=features)
    if max_memory_per_rank is not None and memory > max_memory_per_rank:
        worst = max(best, key=lambda t: t.value)
        estimate.refused = (
            f"needs {memory / 1e6:.4g} MB per rank > budget {max_memory_per_rank / 1e6:.4g} MB "
            f"(largest term {worst.symbol} {worst.name}: {worst.value / 1e6:.4g} MB)"
        )
    return estimate


def replayed_transfers(layout: Layout, forward_s: Sequence[float], backward_s: Sequence[float],
                       links: Sequence[Link], sizes: Sequence[float]) -> Optional[float]:
    """Seconds the pipeline's transfers add to a step of ``layout``'s schedule; ``None`` without its task order.

    Every rank runs its forwards and backwards in the runtime's order (stage ``s`` takes
    ``forward_s[s]`` / ``backward_s[s]`` per micro-batch) with
    :func:`~lightning_distnn.parallel.pipeline.timeline.replay`, once with free transfers and once
    with each activation (and its gradient back) crossing cut ``s`` in ``sizes[s] /
    links[s].bandwidth`` seconds plus ``links[s].latency``: sent in the background (the sender goes
    on computing), one message at a time per direction of a rank pair, received as soon as it lands
    (the runtime posts every receive at the step's start). The difference of the two spans is what
    the transfers cost beyond what the compute hides: a slow link's transfer overlaps the next
    micro-batch's compute, and the schedule decides how much of that there is.
    """
    from lightning_distnn.parallel.pipeline.overlap import compute_orders
    from lightning_distnn.parallel.pipeline.timeline import over_links, replay, task_makes, task_needs

    L = layout
    orders = compute_orders(L.schedule, L.pp, L.microbatches, L.stages_per_rank)
    if orders is None:
        return None
    last = L.num_stages - 1
    send = over_links(dict(enumerate(L.stage_ranks())), lambda a, b: sizes[min(a, b)] / links[min(a, b)].bandwidth,
                      lambda a, b: links[min(a, b)].latency)

    def deliver(task: tuple[str, int, int], end: float) -> float:
        return send(task[0], task[1], end)

    def span(**extra) -> Optional[float]:
        result = replay(dict(orders), duration=lambda t: forward_s[t[1]] if t[0] == "F" else backward_s[t[1]],
                        needs=lambda t: task_needs(*t, last), made=lambda t: task_makes(*t), **extra)
        return None if result is None else max(result[0].values())

    free, timed = span(), span(deliver=deliver)
    if free is None or timed is None:
        return None
    return max(0.0, timed - free)


@dataclass
class SharedCores:
    """The oversubscription term of a layout: how much slower compute runs because ranks share a host's cores.

    ``path_compute``: forward + backward on the critical path with a core per rank (``m C_r* + ...``);
    ``optimizer``: the slowest rank's optimizer step, likewise; ``work``: the compute of all the
    ranks of the busiest host per step (rank-seconds); ``slots``: ranks the host runs at full speed
    at once (cores / threads per rank); ``factor`` = max(1, work / min(slots, ranks) / (path_compute
    + optimizer)): the critical path stretched to the time the host needs for all its work;
    ``busy``: each pipeline rank's busy fraction of the step (its own work / the step's compute).
    """

    path_compute: float
    optimizer: float
    work: float
    slots: float
    ranks: int
    factor: float
    busy: list[float]
    formula: str = ""


def _loop_divisor(L: "Layout") -> int:
    """How much the looped schedules shrink the fill and drain of the pipeline: by ``v`` stages per rank when
    every round is full (``m >= pp``); with fewer micro-batches than ranks each of the ``v`` rounds fills and
    drains on its own, as in GPipe (``v (m + p - 1)`` chunk times: no gain)."""
    v = L.stages_per_rank if L.pp > 1 else 1
    return v if L.microbatches >= L.pp else 1


def shared_cores(layout: Layout, profile: ModelProfile, compute: Sequence[float], per_rank: dict[int, list[int]],
                 rank_params: dict[int, float], slow: int) -> SharedCores:
    """Compute time of ``layout`` on hosts whose ranks share cores (see :class:`SharedCores`).

    ``compute[s]``: seconds of stage ``s`` for one micro-batch on a core of its own; pipeline rank
    ``r`` does ``m * sum(compute of its stages) + its optimizer step`` per step. A host with
    ``slots`` full-speed rank slots and ``R`` ranks needs at least ``sum of their work / min(slots, R)``
    seconds; a rank idle in the pipeline bubble gives its core to a busy one, so the step's compute
    is the longer of the critical path and that.
    """
    L, P = layout, profile
    m = L.microbatches
    mine = sum(compute[s] for s in per_rank[slow])  # slow: the rank on the critical path
    path_compute = m * mine + (sum(compute) - mine) / _loop_divisor(L)
    opt = {r: P.optimizer_s_per_param * rank_params[r] / P.element_size / P.profile_slowdown for r in per_rank}
    optimizer = max(opt.values())
    work = {r: m * sum(compute[s] for s in per_rank[r]) + opt[r] for r in per_rank}
    busiest = path_compute + optimizer
    slots = P.rank_slots
    if not slots or busiest <= 0:
        return SharedCores(path_compute, optimizer, 0.0, 0.0, L.world_size, 1.0, [1.0] * len(per_rank))
    host = P.ranks_per_host if 0 < P.ranks_per_host < L.world_size else L.world_size
    heaviest, ranks = 0.0, host
    for first in range(0, L.world_size, host):
        group = range(first, min(first + host, L.world_size))
        total = sum(work[(g // L.tp) % L.pp if L.pp > 1 else 0] for g in group)
        if total > heaviest:
            heaviest, ranks = total, len(group)
    factor = max(1.0, heaviest / min(slots, ranks) / busiest)
    busy = [work[r] / (factor * busiest) for r in sorted(per_rank)]
    formula = ""
    if factor > 1:
        formula = (f"; x {factor:.3g} shared cores = work {heaviest * 1e3:.4g} ms of {ranks} ranks / min({slots:g} "
                   f"cores, {ranks}) over path {busiest * 1e3:.4g} ms; busy {min(busy):.2f}-{max(busy):.2f}")
    if P.profile_slowdown > 1:
        formula += f"; profile / {P.profile_slowdown:.3g} ({P.profiled_sharing} processes shared {P.cores} cores)"
    return SharedCores(path_compute, optimizer, heaviest, slots, ranks, factor, busy, formula)


def in_flight(layout: Layout, pp_rank: int, stage_bytes: Optional[dict[int, float]] = None) -> dict[int, int]:
    """Micro-batches whose activations stage ``s`` of ``pp_rank`` holds at the schedule's peak: ``{stage: count}``.

    Walks the rank's tasks in the order the runtime runs them (:func:`~lightning_distnn.parallel.pipeline.overlap.compute_orders`):
    a forward of stage ``s`` adds a micro-batch's activations, its backward frees them. The peak is the moment
    the held ``stage_bytes`` (bytes per micro-batch per stage; default 1 each) are largest: an
    interleaved rank can hold more micro-batches of its first stage than the warm-up alone does, while
    its later stage drains. Without the runtime's order, the closed forms: GPipe ``m`` on every stage,
    1F1B ``min(m, p - r)``, interleaved 1F1B ``(v - 1) k + 2 (p - 1 - r)`` warm-up chunk-forwards (``k``
    micro-batches per round) and one more, in turns of ``k``.
    """
    L, r = layout, pp_rank
    stages = [s for s, rank in enumerate(L.stage_ranks()) if rank == r] if L.pp > 1 else [0]
    m, p, v = L.microbatches, L.pp, L.stages_per_rank
    if L.pp == 1:
        return {0: 1}
    weight = stage_bytes or {s: 1.0 for s in stages}
    orders = None
    if L.schedule not in ("gpipe", "1f1b"):  # GPipe and 1F1B: the closed forms are the walk's result
        from lightning_distnn.parallel.pipeline.overlap import compute_orders

        orders = compute_orders(L.schedule, L.pp, L.microbatches, L.stages_per_rank)
    if orders is not None and r in orders:
        held = {s: 0 for s in stages}
        best, peak = dict(held), -1.0
        for kind, stage, _ in orders[r]:  # the planner's schedules run full backwards (B), no split I/W
            held[stage] += 1 if kind == "F" else -1
            total = sum(weight.get(s, 0.0) * n for s, n in held.items())
            if kind == "F" and total > peak:
                best, peak = dict(held), total
        return best
    if L.schedule == "gpipe":
        return {s: m for s in stages}
    if L.schedule == "1f1b":
        return {stages[0]: min(m, p - r)}
    per_round = m // max(1, m // p)
    forwards = min(m * v, (v - 1) * per_round + 2 * (p - 1 - r) + 1)
    counts = {s: 0 for s in stages}
    for k in range(forwards):
        counts[stages[(k // per_round) % v]] += 1
    return counts


def p2p_bytes(layout: Layout, profile: ModelProfile, stages: list[list[int]], mu: float) -> list[float]:
    """Bytes each stage sends per micro-batch: its output forward, the gradient of its input back."""
    out = []
    for s, layers in enumerate(stages):
        sent = 0.0
        if s < len(stages) - 1:
            sent += profile.layers[layers[-1]].out_bytes * mu
        if s > 0:
            sent += profile.layers[layers[0] - 1].out_bytes * mu
        out.append(sent)
    return out
