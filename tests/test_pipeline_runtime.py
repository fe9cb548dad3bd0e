"""The pipeline runtime on batches of any size (issue 18): ragged last batches equal one process.

Pure torch (``apply_pipeline`` + ``Pipeline.train_step`` / ``forward``) on 2 gloo processes,
against a ``copy.deepcopy`` reference trained on one process with the same batches; fp32
tolerance 1e-5.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_distnn.parallel.pipeline import BatchSplit, apply_pipeline, auto_microbatches, measure_link, split_batch
from lightning_distnn.partition.model import LinkCost, balanced, uniform
from lightning_distnn.testing import assert_state_dicts_close, run_distributed

MICRO, BATCH, LR = 4, 8, 0.1
# (schedule, data set size, accumulate_grad_batches): 17 = 8 + 8 + 1 leaves a remainder of 1 (fewer samples
# than the 2 stages of gpipe/1f1b); 19 = 8 + 8 + 3 ends with fewer samples than the 4 stages of the 2-per-rank
# schedules; 27 = 8 + 8 + 8 + 3 accumulates two batches of different sizes per optimizer step
CASES = [
    ("gpipe", 17, 1),
    ("1f1b", 17, 1),
    ("1f1b", 27, 2),
    ("interleaved_1f1b", 19, 1),
    ("interleaved_1f1b", 17, 1),
    ("zbv_zero_bubble", 19, 1),
    ("zbv_zero_bubble", 27, 2),
]
EVAL_SIZES = (1, 3, 10)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _batches(n: int) -> list[slice]:
    return [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


def _train(step_fn, params, n: int, accumulate: int) -> None:
    """Lightning's loop: zero, accumulate ``accumulate`` batches, step (and step on the last batch)."""
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    batches = _batches(n)
    for i, sl in enumerate(batches):
        if i % accumulate == 0:
            optimizer.zero_grad()
        step_fn(sl)
        if (i + 1) % accumulate == 0 or i == len(batches) - 1:
            optimizer.step()


def _reference(n: int, accumulate: int) -> tuple[nn.Sequential, list[float], list[torch.Tensor]]:
    """One process: the trained network, each batch's mean loss and output."""
    net = copy.deepcopy(_net())
    x, y = _data(n)
    losses, outputs = [], []

    def step(sl):
        output = net(x[sl])
        outputs.append(output.detach().clone())
        loss = nn.functional.cross_entropy(output, y[sl])
        losses.append(loss.item())
        (loss / accumulate).backward()

    _train(step, net.parameters(), n, accumulate)
    return net, losses, outputs


def _run_cases(rank: int, world: int) -> list[dict]:
    link = measure_link(dist.group.WORLD, repeats=5, big_bytes=1 << 16)
    out = [{"latency": link.latency_s, "bandwidth": link.bandwidth_Bps}]
    for schedule, n, accumulate in CASES:
        net = _net()
        stages = 2 if schedule in ("gpipe", "1f1b") else 4
        pipe = apply_pipeline(
            net,
            uniform(len(net), stages),
            group=dist.group.WORLD,
            device=torch.device("cpu"),
            loss_fn=nn.functional.cross_entropy,
            schedule=schedule,
            microbatches=MICRO,
        )
        pipe.accumulate_grad_batches = accumulate
        x, y = _data(n)
        splits = []

        losses, outputs = [], []

        def step(sl):
            # share_output: the last stage's output on both ranks (one early-posted message; buffers reused, so clone)
            outputs.append(pipe.train_step(x[sl], y[sl], share_output=True).clone())
            splits.append(pipe.last_split)
            losses.append(None if pipe.last_loss is None else float(pipe.last_loss))

        _train(step, [p for m in pipe.modules for p in m.parameters()], n, accumulate)
        state = {k: v.detach().clone() for m in pipe.modules for k, v in m.state_dict().items()}
        records: list = [None] * dist.get_world_size()
        dist.all_gather_object(records, pipe.timeline.records)
        structural = pipe.structural_bubble([r for part in records for r in part])
        evals = {}
        for size in EVAL_SIZES:
            result = pipe.forward(x[:size], size)
            evals[size] = None if result is None else result.detach().clone()
        out.append({
            "state": state, "splits": splits, "eval": evals, "last": pipe.is_last, "bubble": dict(pipe.bubble(), structural=structural),
            "breakdown": pipe.breakdown(), "kinds": {r.kind for r in pipe.timeline.records},
            "stages": pipe.stage_indices, "losses": losses, "outputs": outputs,
        })
    return out


def test_ragged_batches_equal_one_process():
    per_rank = run_distributed(_run_cases, 2, init_process_group=True, timeout=420)
    for r in per_rank:  # the measured link (both ranks take part)
        link = r.pop(0)
        assert link["latency"] > 0 and link["bandwidth"] > 0
    for i, (schedule, n, accumulate) in enumerate(CASES):
        where = f"schedule={schedule}, {n} samples, accumulate_grad_batches={accumulate}"
        ref, ref_losses, ref_outputs = _reference(n, accumulate)
        merged = {}
        for r in per_rank:
            assert not set(merged) & set(r[i]["state"]), f"{where}: a layer is on two ranks"
            merged.update(r[i]["state"])
        assert set(merged) == set(ref.state_dict()), where
        try:
            assert_state_dicts_close(merged, ref.state_dict(), atol=1e-5)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None
        # the last stage's rank reports each batch's mean loss (the reference's, at the same weights)
        losses = [r[i]["losses"] for r in per_rank if r[i]["last"]][0]
        assert losses == pytest.approx(ref_losses, abs=1e-5), where
        # every rank got each batch's output (share_output), the reference's
        for r in per_rank:
            assert len(r[i]["outputs"]) == len(ref_outputs), where
            for got, want in zip(r[i]["outputs"], ref_outputs):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # the last batch really was short, and ran with fewer micro-batches
        last = per_rank[0][i]["splits"][-1]
        assert last.microbatches * last.micro_size == n % BATCH
        assert last.microbatches < MICRO
        # evaluation: every sample once (no padded duplicates), equal to the reference's outputs
        x, _ = _data(n)
        holders = [r[i]["eval"] for r in per_rank if r[i]["last"]]
        assert len(holders) == 1, where
        with torch.no_grad():
            for size in EVAL_SIZES:
                got = holders[0][size]
                assert got.shape[0] == size, f"{where}: eval of {size} samples returned {got.shape[0]} rows"
                torch.testing.assert_close(got, ref(x[:size]), atol=1e-5, rtol=0)
        # the timeline: compute, receive waits (from a neighbouring stage on the other rank) and sends, no span
        # counted twice
        for r in per_rank:
            parts, bubble = r[i]["breakdown"], r[i]["bubble"]
            assert {"F", "R", "S"} <= r[i]["kinds"], f"{where}: {r[i]['kinds']}"
            assert parts["compute"] > 0 and parts["recv_wait"] > 0, f"{where}: {parts}"
            assert parts["compute"] + parts["recv_wait"] + parts["send"] <= parts["span"] * 1.001, f"{where}: {parts}"
            sources = {int(k.rsplit("_", 1)[1]) for k in parts if k.startswith("recv_from_")}
            neighbours = {s + d for s in r[i]["stages"] for d in (-1, 1)} - set(r[i]["stages"])
            assert sources and sources <= neighbours, f"{where}: waits from {sources}, neighbours {neighbours}"
            assert 0.0 <= bubble["measured"] <= 1.0 and {"recv_wait", "send", "other", "outside"} <= set(bubble)
            assert 0.0 <= bubble["structural"] < 1.0, f"{where}: the replay of the recorded tasks failed: {bubble}"


@pytest.mark.parametrize(
    "schedule, stages, batch, expected",
    [
        ("gpipe", 2, 16, BatchSplit("gpipe", 4, 4)),
        ("gpipe", 2, 10, BatchSplit("gpipe", 2, 5)),
        ("gpipe", 2, 1, BatchSplit("gpipe", 1, 1)),
        ("1f1b", 2, 3, BatchSplit("1f1b", 3, 1)),
        ("1f1b", 2, 1, BatchSplit("gpipe", 1, 1)),  # fewer samples than stages: GPipe runs it
        ("1f1b", 2, 7, BatchSplit("gpipe", 1, 7)),  # no count >= pp divides 7
        ("interleaved_1f1b", 4, 3, BatchSplit("interleaved_1f1b", 3, 1)),
        ("zbv_zero_bubble", 4, 9, BatchSplit("zbv_zero_bubble", 3, 3)),
        ("dualpipev", 4, 10, BatchSplit("zbv_zero_bubble", 2, 5)),  # DualPipeV needs m >= stages
    ],
)
def test_split_batch(schedule, stages, batch, expected):
    assert split_batch(batch, MICRO, schedule=schedule, pp_size=2, num_stages=stages) == expected


def test_split_batch_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="at least one sample"):
        split_batch(0, MICRO, schedule="gpipe", pp_size=2, num_stages=2)


def _synthetic_records(m: int = 8, ranks: int = 2, per_rank: int = 2):
    """An interleaved-like step: a 40 ms wait, then every local stage runs F (0.5 ms) and B (2 ms) of m micro-batches."""
    from lightning_distnn.parallel.pipeline import TaskRecord

    out = []
    for rank in range(ranks):
        out.append(TaskRecord(0, rank, rank, 0, "R", 0.0, 0.04, peer=rank - 1))
        t = 0.04
        for local in range(per_rank):
            stage = rank + local * ranks
            for kind, duration in (("F", 5e-4), ("B", 2e-3)):
                for mb in range(m):
                    out.append(TaskRecord(0, rank, stage, mb, kind, t, t + duration))
                    t += duration
    return out


def _replay_input(order: dict, durations: dict):
    """Records of one step, each rank's tasks back to back in ``order`` (the clock times do not matter)."""
    from lightning_distnn.parallel.pipeline import TaskRecord

    out = []
    for rank, tasks in order.items():
        t = 100.0 * rank  # clocks of different hosts: the replay uses durations and order only
        for stage, kind, mb in tasks:
            out.append(TaskRecord(0, rank, stage, mb, kind, t, t + durations[(stage, kind)]))
            t += durations[(stage, kind)] + 0.5
    return out


def test_structural_bubble_replays_the_schedule_with_free_communication():
    from lightning_distnn.parallel.pipeline.timeline import structural_bubble

    m = 4
    gpipe = {r: [(r, "F", i) for i in range(m)] + [(r, "B", i) for i in range(m)] for r in range(2)}
    # equal stages, F = 1, B = 2: rank 0 computes 12 of 15 time units (the textbook (p-1)/(m+p-1) = 0.2);
    # rank 1 starts at 1 (waits for F0 of stage 0) and ends at 13
    got = structural_bubble(_replay_input(gpipe, {(0, "F"): 1, (0, "B"): 2, (1, "F"): 1, (1, "B"): 2}))
    assert got == pytest.approx({0: 3 / 15, 1: 1 / 13})
    # stage 1 twice as slow: rank 1 runs F 1..9 and B 9..25; rank 0's backward i follows rank 1's (ends 13, 17,
    # 21, 25), its last one ending at 27: rank 0 computes 12 of 27, where the textbook says 0.2
    got = structural_bubble(_replay_input(gpipe, {(0, "F"): 1, (0, "B"): 2, (1, "F"): 2, (1, "B"): 4}))
    assert got == pytest.approx({0: 1 - 12 / 27, 1: 1 - 24 / 25})
    # zero bubble: the input gradient (I) goes upstream at once, the weight gradient (W) fills the wait
    zb = {0: [(0, "F", 0), (0, "F", 1), (0, "I", 0), (0, "W", 0), (0, "I", 1), (0, "W", 1)],
          1: [(1, "F", 0), (1, "I", 0), (1, "F", 1), (1, "W", 0), (1, "I", 1), (1, "W", 1)]}
    unit = {(s, k): 1 for s in (0, 1) for k in "FIW"}
    got = structural_bubble(_replay_input(zb, unit))
    # rank 1: F0 1-2, I0 2-3, F1 3-4, W0 4-5, I1 5-6, W1 6-7 (6 of 7); rank 0: F0, F1, I0 waits for I0 of stage 1
    # (ends 3) 3-4, W0 4-5, I1 waits for 6: 6-7, W1 7-8 (6 of 8)
    assert got == pytest.approx({0: 2 / 8, 1: 1 / 7})
    # the same GPipe step over a link: 0.5 per message, sent in the background. Rank 1's forwards start at 1.5
    # and stream (F3 ends 5.5, B 5.5-13.5); rank 0's backwards wait for the gradients (8, 10, 12, 14): 12 of 16
    equal = {(0, "F"): 1, (0, "B"): 2, (1, "F"): 1, (1, "B"): 2}
    got = structural_bubble(_replay_input(gpipe, equal), transfer=lambda a, b: 0.5)
    assert got == pytest.approx({0: 4 / 16, 1: 1.5 / 13.5})
    # 1.5 per message, longer than a forward: the link sends one message at a time, activations land at 2.5, 4,
    # 5.5, 7 (rank 1: F 2.5-8, B 8-16), gradients at 11.5, 13.5, 15.5, 17.5 (rank 0 ends at 19.5)
    got = structural_bubble(_replay_input(gpipe, equal), transfer=lambda a, b: 1.5)
    assert got == pytest.approx({0: 7.5 / 19.5, 1: 4 / 16})
    # a task waiting for one that never comes back in order cannot be replayed: NaN, not a guess
    stuck = {0: [(0, "B", 0), (0, "F", 0)], 1: [(1, "F", 0), (1, "B", 0)]}
    got = structural_bubble(_replay_input(stuck, {(0, "F"): 1, (0, "B"): 1, (1, "F"): 1, (1, "B"): 1}))
    assert all(v != v for v in got.values())


def test_gantt_labels_do_not_overlap_at_m8_with_two_stages_per_rank():
    import matplotlib

    matplotlib.use("Agg")
    from lightning_distnn.pipeline_viz import COLORS, draw_timeline

    fig = draw_timeline(_synthetic_records(), title="interleaved, m=8")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert boxes, "no task is labelled"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two task labels overlap"
    # waits have their own colour
    assert any(tuple(p.get_facecolor()[:3]) == matplotlib.colors.to_rgb(COLORS["R"]) for p in ax.patches)
    matplotlib.pyplot.close(fig)


def test_auto_microbatches_follows_the_link():
    plan = balanced([0.002] * 8, 2)
    counts = [
        auto_microbatches(plan, 64, profiled_batch=16, cut_bytes=[16 * 1024] * 8, link=LinkCost(latency, 1e9),
                          schedule="1f1b", pp_size=2)
        for latency in (1e-5, 1e-4, 1e-3, 1e-2)
    ]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] >= 2  # 1F1B needs m >= pp
    assert all(64 % m == 0 for m in counts)
    with pytest.raises(ValueError, match="measured layer costs"):
        auto_microbatches(uniform(8, 2), 64, profiled_batch=16, cut_bytes=[1] * 8, link=LinkCost(1e-4, 1e9),
                          schedule="1f1b", pp_size=2)


def test_overlap_orders_and_early_receives():
    """The compute orders the overlapped GPipe/1F1B run (torch's own task order), and receives moved to the front."""
    from lightning_distnn.parallel.pipeline.overlap import early_receives, gpipe_order, one_f_one_b_order

    def text(actions):
        return " ".join(str(a) for a in actions)

    assert text(gpipe_order(1, 2)) == "1F0 1F1 1B0 1B1"
    assert text(one_f_one_b_order(0, 4, 2)) == "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3"
    assert text(one_f_one_b_order(1, 4, 2)) == "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"
    assert text(one_f_one_b_order(0, 1, 2)) == "0F0 0B0"  # fewer micro-batches than the warm-up
    from torch.distributed.pipelining.schedules import _Action

    actions = [_Action.from_str(a) for a in "1RECV_F0 1F0 1SEND_F0 1RECV_F1 1RECV_B0 1B0 1F1".split()]
    assert text(early_receives(actions)) == "1RECV_F0 1RECV_F1 1RECV_B0 1F0 1SEND_F0 1B0 1F1"


def test_auto_choice_says_why():
    from lightning_distnn.parallel.pipeline import auto_choice

    plan = balanced([0.004, 0.004, 0.004, 0.004], 2)  # seconds per layer on the whole batch of 64
    fast = auto_choice(plan, 64, cut_bytes=[4096] * 4, link=LinkCost(1e-6, 1e10), schedule="1f1b", pp_size=2)
    slow = auto_choice(plan, 64, cut_bytes=[4096] * 4, link=LinkCost(5e-3, 1e8), schedule="1f1b", pp_size=2)
    assert fast["microbatches"] > slow["microbatches"] >= 2 and 64 % fast["microbatches"] == 0
    assert fast["vs_data_parallel"] >= 0.8 and "cannot pay off" not in fast["why"]
    assert slow["vs_data_parallel"] < 0.8 and "cannot pay off at this size" in slow["why"]
    assert f"chose m={slow['microbatches']} for a per-replica batch of 64" in slow["why"]
    # a batch of 1 has no count 1F1B accepts on 2 ranks: the message to raise on every rank
    assert "no micro-batch count" in auto_choice(plan, 1, cut_bytes=[1] * 4, link=LinkCost(1e-4, 1e9),
                                                 schedule="1f1b", pp_size=2)
