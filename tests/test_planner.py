"""Planner: cost model and search on hand-made profiles whose best layout is known by hand; profile; cache."""

import json
import math

import pytest
import torch

from lightning_distnn.models import CaseStudyCNN
from lightning_distnn.planner import (
    Calibration,
    LayerProfile,
    Layout,
    Link,
    ModelProfile,
    Network,
    NoLayoutFits,
    fit_link,
    plan_layout,
    predict,
    profile_model,
    search,
    strategy_for,
)
from lightning_distnn.planner.measure import fit_calibration

MS = 1e-3


def hand_profile(n=4, fwd=1 * MS, bwd=2 * MS, param_bytes=4000, out_bytes=400, saved_bytes=800, **machine):
    """n equal layers whose forward/backward take ``fwd``/``bwd`` seconds per sample (linear in the batch)."""
    layers = [
        LayerProfile(index=i, name=f"L{i}", forward_s={1: fwd, 8: 8 * fwd}, backward_s={1: bwd, 8: 8 * bwd},
                     param_bytes=param_bytes, out_bytes=out_bytes, saved_bytes=saved_bytes)
        for i in range(n)
    ]
    return ModelProfile(layers=layers, input_bytes=out_bytes, **machine)


FAST = Network(Link(latency=1e-6, bandwidth=1e12))
SLOW = Network(Link(latency=1e-4, bandwidth=1e8))


# ---- the cost model, by hand -----------------------------------------------------------------
def test_data_parallel_step_is_compute_plus_allreduce():
    prof = hand_profile(param_bytes=10**6)
    est = predict(Layout(dp=2), prof, SLOW, global_batch=32)
    terms = {t.symbol: t.value for t in est.terms}
    assert terms["T_1"] == pytest.approx(16 * 4 * 3 * MS)  # 16 samples x 4 layers x 3 ms
    P = 4 * 10**6
    assert terms["S_3"] == pytest.approx(2 * 1e-4 + P / 1e8)  # ring over 2: 2 latencies + (2*1/2) P / bandwidth
    assert terms["S_1"] == terms["S_2"] == terms["T_0"] == 0
    assert est.step_s == pytest.approx(sum(terms.values()))
    assert est.images_per_s == pytest.approx(32 / est.step_s)
    half = predict(Layout(dp=2, compression="fp16"), prof, SLOW, global_batch=32)
    assert {t.symbol: t.value for t in half.terms}["S_3"] == pytest.approx(2 * 1e-4 + P / 2 / 1e8)
    # compression's measured local cost (casts, half-precision sums) per fp32 gradient byte comes on top
    costly = Network(SLOW.intra, compress_s_per_byte=1e-8)
    half = predict(Layout(dp=2, compression="fp16"), prof, costly, global_batch=32)
    assert {t.symbol: t.value for t in half.terms}["S_3"] == pytest.approx(2 * 1e-4 + P / 2 / 1e8 + 1e-8 * P)
    full = predict(Layout(dp=2), prof, costly, global_batch=32)
    assert {t.symbol: t.value for t in full.terms}["S_3"] == pytest.approx(2 * 1e-4 + P / 1e8)
    assert Network.from_dict(costly.to_dict()) == costly


def test_parameter_server_memory_is_held_by_the_server_rank():
    """Sync mode: the server holds its parameters and states, and per remote worker a pushed gradient and the
    parameters sent back; the workers keep no optimizer state (their optimizer never steps)."""
    prof = hand_profile(param_bytes=10**6)
    W = 4 * 10**6

    def terms(**layout):
        return {t.symbol: t.value for t in predict(Layout(**layout), prof, FAST, global_batch=32).memory_terms}

    four = terms(dp=4, sync="parameter_server")
    assert four["M_3"] == 0
    assert four["M_5"] == pytest.approx(2 * W + 3 * (W + W))  # SGD with momentum: 1 state per parameter
    assert terms(dp=2, sync="parameter_server")["M_5"] == pytest.approx(2 * W + (W + W))
    assert terms(dp=4, sync="parameter_server", compression="fp16")["M_5"] == pytest.approx(2 * W + 3 * (W / 2 + W))
    assert terms(dp=4)["M_3"] == W and terms(dp=4)["M_5"] == W  # all-reduce: the flat gradient copy


def test_pipeline_step_is_bubble_formula():
    prof = hand_profile()
    m, p = 4, 2
    est = predict(Layout(pp=2, schedule="gpipe", microbatches=m, partition=(2, 2)), prof, SLOW, global_batch=32)
    terms = {t.symbol: t.value for t in est.terms}
    c = 8 * 2 * 3 * MS  # micro-batch of 8 through 2 layers
    assert terms["T_1"] == pytest.approx((m + p - 1) * c)
    send = 1e-4 + 400 * 8 / 1e8  # one activation (or its gradient) of a micro-batch across the cut
    # sends shorter than a micro-batch's compute stream behind it: one lands on the path while the pipeline
    # fills (rank 1's first forward), one while it drains (rank 0's first backward)
    assert terms["S_1"] == pytest.approx(2 * send)
    assert terms["S_3"] == 0  # no data parallelism


def test_a_slow_link_overlaps_compute_by_the_schedule():
    """2 stages of 1 layer, a link slower than the compute (3200 B in 40 ms, no latency): by hand, in ms."""
    prof = hand_profile(n=2)
    slow = Network(Link(latency=0.0, bandwidth=80_000.0))

    def step_ms(schedule, m):
        est = predict(Layout(pp=2, schedule=schedule, microbatches=m, partition=(1, 1)), prof, slow, global_batch=8)
        terms = {t.symbol: t.value for t in est.terms}
        return terms["T_1"] * 1e3, terms["S_1"] * 1e3

    # m=1: F 8, send 40, F 8, B 16, send 40, B 16: nothing overlaps
    assert step_ms("gpipe", 1) == pytest.approx((48, 80))
    # m=2 (F 4, B 8, 20 per message): GPipe's rank 1 starts at 24 and 44, rank 0's backwards at 76 and 96 -> 104;
    # free transfers: 36
    assert step_ms("gpipe", 2) == pytest.approx((36, 68))
    # 1F1B: rank 1 runs F0 B0 before the second activation lands, so its first gradient leaves 20 ms earlier -> 84
    assert step_ms("1f1b", 2) == pytest.approx((36, 48))


def test_interleaving_shrinks_the_bubble_and_1f1b_the_memory():
    prof = hand_profile(n=8)
    gpipe = predict(Layout(pp=2, schedule="gpipe", microbatches=8, partition=(4, 4)), prof, FAST, global_batch=32)
    one = predict(Layout(pp=2, schedule="1f1b", microbatches=8, partition=(4, 4)), prof, FAST, global_batch=32)
    inter = predict(Layout(pp=2, schedule="interleaved_1f1b", microbatches=8, partition=(2, 2, 2, 2), stages_per_rank=2),
                    prof, FAST, global_batch=32)
    t1 = [{t.symbol: t.value for t in e.terms}["T_1"] for e in (gpipe, one, inter)]
    assert t1[0] == pytest.approx(t1[1])
    c = 4 * 4 * 3 * MS
    assert t1[0] == pytest.approx((8 + 1) * c)
    assert t1[2] == pytest.approx((8 + 1 / 2) * c)  # (m + (p-1)/v) c
    mem = [{t.symbol: t.value for t in e.memory_terms}["M_4"] for e in (gpipe, one)]
    assert mem[1] == pytest.approx(mem[0] * 2 / 8)  # 1F1B keeps p = 2 micro-batches in flight, GPipe m = 8
    # one micro-batch on 2 ranks: it crosses the 4 chunks one after another, as GPipe's 2 stages (no gain from v)
    gpipe1 = predict(Layout(pp=2, schedule="gpipe", microbatches=1, partition=(4, 4)), prof, FAST, global_batch=32)
    inter1 = predict(Layout(pp=2, schedule="interleaved_1f1b", microbatches=1, partition=(2, 2, 2, 2),
                            stages_per_rank=2), prof, FAST, global_batch=32)
    t1 = [{t.symbol: t.value for t in e.terms}["T_1"] for e in (gpipe1, inter1)]
    assert t1[1] == pytest.approx(t1[0]) and t1[0] == pytest.approx(2 * 32 * 4 * 3 * MS)


def test_only_the_pipeline_cut_between_nodes_runs_at_the_slow_link():
    """pp=4 on 2 nodes of 2 ranks: stages 1 -> 2 cross the nodes, the other two cuts stay inside a node."""
    prof = hand_profile(n=4)
    layout = Layout(pp=4, schedule="gpipe", microbatches=1, partition=(1, 1, 1, 1))
    fast, slow = Link(latency=1e-6, bandwidth=1e12), Link(latency=1e-2, bandwidth=1e6)

    def s1(network):
        return {t.symbol: t.value for t in predict(layout, prof, network, global_batch=8).terms}["S_1"]

    two_nodes = s1(Network(fast, slow, ranks_per_node=2))
    every_cut_slow = s1(Network(slow))
    one_cut = 2 * slow.p2p(400 * 8)  # the activation forward and its gradient back, one micro-batch
    assert two_nodes == pytest.approx(one_cut, rel=0.01)
    assert every_cut_slow == pytest.approx(3 * one_cut, rel=0.01)


def test_shared_cores_stretch_the_step_to_the_hosts_work():
    """10 ranks on 2 cores: every layout's compute is at least the host's total work / 2 cores."""
    layers5 = dict(n=5)  # 15 ms per sample through the model, 3 ms per layer
    alone = hand_profile(**layers5)  # cores=0: a core per rank (GPU-like), no sharing term
    shared = hand_profile(cores=2, threads=1, **layers5)
    dp = Layout(dp=10)
    pipe = Layout(dp=2, pp=5, schedule="gpipe", microbatches=4, partition=(1, 1, 1, 1, 1))

    def t1(est):
        return {t.symbol: t for t in est.terms}["T_1"]

    # dp10, 4 samples per rank: 60 ms each; the host runs 10 x 60 ms on 2 cores -> 300 ms
    assert t1(predict(dp, alone, FAST, global_batch=40)).value == pytest.approx(60 * MS)
    est = predict(dp, shared, FAST, global_batch=40)
    assert t1(est).value == pytest.approx(300 * MS) and est.features["cores_factor"] == pytest.approx(5)
    # dp2 x pp5 GPipe, m=4 micro-batches of 5: path (m + p - 1) c = 8 x 15 ms = 120 ms with a core per rank;
    # each rank computes 4 x 15 = 60 ms, busy 20% of a 300 ms step: the host's 600 ms of work on 2 cores wins
    assert t1(predict(pipe, alone, FAST, global_batch=40)).value == pytest.approx(120 * MS)
    est = predict(pipe, shared, FAST, global_batch=40)
    assert t1(est).value == pytest.approx(300 * MS)
    assert est.features["busy_max"] == pytest.approx(0.2)
    assert "shared cores" in t1(est).formula and "busy 0.20-0.20" in est.seed_form()
    # enough cores for every rank: no term; two hosts of 5 ranks with 5 cores each: none either
    assert predict(pipe, hand_profile(cores=16, **layers5), FAST, global_batch=40).step_s == pytest.approx(
        predict(pipe, alone, FAST, global_batch=40).step_s)
    assert t1(predict(dp, hand_profile(cores=5, ranks_per_host=5, **layers5), FAST, global_batch=40)).value == \
        pytest.approx(60 * MS)
    # two threads per rank on 2 cores: one rank fills the host, the 10 take 10 x 60 ms
    assert t1(predict(dp, hand_profile(cores=2, threads=2, **layers5), FAST, global_batch=40)).value == \
        pytest.approx(600 * MS)


def test_profile_taken_on_shared_cores_is_decontended():
    """A profile measured by 10 processes on 2 cores ran 5x slow; dp10 on the same host gets that time back."""
    profiled = hand_profile(n=5, cores=2, threads=1, profiled_sharing=10)
    assert profiled.profile_slowdown == pytest.approx(5)
    est = predict(Layout(dp=10), profiled, FAST, global_batch=40)
    assert {t.symbol: t.value for t in est.terms}["T_1"] == pytest.approx(60 * MS)
    pipe = Layout(pp=5, schedule="gpipe", microbatches=8, partition=(1,) * 5)  # one replica: 5 ranks, 2 cores
    # per micro-batch of 5 samples a stage takes 15 ms / 5 = 3 ms alone; path (8 + 4) x 3 = 36 ms,
    # work 5 ranks x 8 x 3 ms = 120 ms on 2 cores = 60 ms
    assert {t.symbol: t.value for t in predict(pipe, profiled, FAST, global_batch=40).terms}["T_1"] == \
        pytest.approx(60 * MS)


def test_search_on_shared_cores_stops_preferring_data_parallel_by_the_bubble_alone():
    """On 10 ranks / 2 cores the bubble costs nothing: dp10 and dp2 x pp5 predict the same compute."""
    shared = hand_profile(n=5, cores=2, threads=1)
    plan = search(shared, FAST, world_size=10, global_batch=40, compressions=("none",), syncs=("allreduce",))
    dp = plan.find(dp=10)
    pipe = plan.find(dp=2, pp=5, schedule="gpipe", microbatches=4)
    assert {t.symbol: t.value for t in pipe.terms}["T_1"] == pytest.approx({t.symbol: t.value for t in dp.terms}["T_1"])


def test_tensor_parallel_splits_compute_and_adds_collectives():
    prof = hand_profile()
    for layer in prof.layers:
        from lightning_distnn.planner import TPCost

        layer.tp[2] = TPCost(sharded=1.0, bytes_per_sample=1000.0, collectives=2, out_sharded=False)
    est = predict(Layout(tp=2), prof, SLOW, global_batch=32)
    terms = {t.symbol: t.value for t in est.terms}
    assert terms["T_1"] == pytest.approx(32 * 4 * 3 * MS / 2)
    assert terms["S_2"] == pytest.approx(4 * (2 * 2 * 1e-4 + 1000 * 32 / 1e8))
    assert {t.symbol: t.value for t in est.memory_terms}["M_1"] == pytest.approx(4 * 4000 / 2)
    # the framework's own time per collective (measured with the links) is charged to every one of them
    dispatch = Network(SLOW.intra, tp_collective_s=1e-3)
    costly = {t.symbol: t.value for t in predict(Layout(tp=2), prof, dispatch, global_batch=32).terms}
    assert costly["S_2"] - terms["S_2"] == pytest.approx(4 * 2 * 1e-3)


def test_bad_layouts_are_refused_with_the_fix():
    prof = hand_profile()
    with pytest.raises(ValueError, match="does not split over dp=3"):
        predict(Layout(dp=3), prof, FAST, global_batch=32)
    with pytest.raises(ValueError, match="1f1b needs at least pp=4"):
        predict(Layout(pp=4, schedule="1f1b", microbatches=2, partition=(1, 1, 1, 1)), prof, FAST, global_batch=32)
    with pytest.raises(ValueError, match="adding up to 4"):
        predict(Layout(pp=2, schedule="gpipe", microbatches=2, partition=(1, 2)), prof, FAST, global_batch=32)
    with pytest.raises(ValueError, match="whole-model replicas"):
        predict(Layout(dp=1, pp=2, schedule="gpipe", partition=(2, 2), sync="parameter_server"), prof, FAST,
                global_batch=32)


# ---- search: the best layout is known by hand ------------------------------------------------------
def test_small_model_fast_links_picks_data_parallel():
    plan = search(hand_profile(), FAST, world_size=4, global_batch=32)
    # pp never beats dp here: every layout computes the same 32 x 12 ms, pipelines add a bubble
    assert (plan.best.layout.dp, plan.best.layout.pp, plan.best.layout.tp) == (4, 1, 1)
    assert plan.strategy().name == "distnn_dp"


def test_huge_model_slow_links_picks_the_pipeline():
    plan = search(hand_profile(param_bytes=10**9), SLOW, world_size=4, global_batch=32)
    best = plan.best.layout
    # the all-reduce of GBs of gradients dwarfs everything; pp4 with one layer per stage, most micro-batches
    assert (best.dp, best.pp, best.partition, best.microbatches) == (1, 4, (1, 1, 1, 1), 32)
    # GPipe streams its sends behind the compute: 3 land on the path while the pipeline fills, 3 while it
    # drains; 1F1B alternates a forward and a backward, so a transfer waits on the path in its steady state
    assert best.schedule == "gpipe"
    s1 = {t.symbol: t.value for t in plan.best.terms}["S_1"]
    assert s1 == pytest.approx(6 * SLOW.intra.p2p(400))
    one = plan.find(pp=4, schedule="1f1b", microbatches=32)
    assert {t.symbol: t.value for t in one.terms}["S_1"] > 4 * s1
    choice = plan.strategy()
    assert choice.name == "distnn_hybrid"
    assert choice.kwargs == {"dp": 1, "pp": 4, "tp": 1, "schedule": "gpipe", "microbatches": 32,
                             "partition": [1, 1, 1, 1]}


def test_balanced_partition_follows_the_profile():
    prof = hand_profile()
    prof.layers[0].forward_s = {1: 7 * MS, 8: 56 * MS}  # layer 0 costs 9 ms/sample, the rest 3 ms
    plan = search(prof, FAST, world_size=2, global_batch=16, syncs=["allreduce"], compressions=["none"],
                  schedules=["gpipe"])
    pipes = [e for e in plan.ranked if e.layout.pp == 2]
    assert pipes and all(e.layout.partition in ((1, 3), (2, 2)) for e in pipes)
    assert pipes[0].layout.partition == (1, 3)


def test_over_budget_is_never_chosen():
    prof = hand_profile(param_bytes=10**6, saved_bytes=10**5)
    everything = search(prof, FAST, world_size=4, global_batch=32)
    memories = sorted({e.memory_bytes for e in everything.ranked})
    assert everything.best.layout.dp == 4
    for budget in memories[:: max(1, len(memories) // 8)] + [memories[-1]]:
        plan = search(prof, FAST, world_size=4, global_batch=32, max_memory_per_rank=budget)
        assert all(e.memory_bytes <= budget for e in plan.ranked)
        assert all(e.memory_bytes > budget and "budget" in e.refused for e in plan.refused)
        assert plan.best.memory_bytes <= budget
    tight = search(prof, FAST, world_size=4, global_batch=32, max_memory_per_rank=memories[0])
    assert tight.best.layout.dp < 4  # the fastest (dp4) replicates everything and is refused


def test_no_layout_fits_says_which_knob():
    with pytest.raises(NoLayoutFits, match=r"raise max_memory_per_rank .* to at least \d+ MB"):
        search(hand_profile(param_bytes=10**8), FAST, world_size=2, global_batch=8, max_memory_per_rank=1e6)
    with pytest.raises(NoLayoutFits, match="multiple of 4"):
        search(hand_profile(n=1), FAST, world_size=4, global_batch=3)


def test_plan_prints_table_and_seed_sums_and_json():
    plan = search(hand_profile(), SLOW, world_size=4, global_batch=32)
    text = str(plan)
    assert "| rank | layout | step ms |" in text
    assert "T = T_0 + T_1 + T_2" in text and "S = S_1 + S_2 + S_3" in text and "M = M_1 +" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["best"]["layout"] == plan.best.layout.label
    assert data["best"]["step_s"] == pytest.approx(plan.best.step_s)


def test_strategy_for_maps_layouts_to_registered_strategies():
    assert strategy_for(Layout(dp=4, compression="fp16")).kwargs == {"compression": "fp16"}
    assert strategy_for(Layout(dp=4, sync="parameter_server")).name == "distnn_ps"
    tp = strategy_for(Layout(dp=2, tp=2, compression="bf16"))
    assert (tp.class_name, tp.kwargs) == ("HybridStrategy", {"dp": 2, "pp": 1, "tp": 2, "compression": "bf16"})
    strategy = strategy_for(Layout(dp=2, pp=2, schedule="1f1b", microbatches=2, partition=(3, 5))).build(timeout=30)
    assert type(strategy).__name__ == "HybridStrategy"


def test_fit_link_and_calibration_recover_known_values():
    link = fit_link([1e3, 1e5, 1e6], [2e-4 + n / 5e8 for n in (1e3, 1e5, 1e6)])
    assert link.latency == pytest.approx(2e-4) and link.bandwidth == pytest.approx(5e8)
    assert Link(1e-4, 1e9).allreduce(1e6, 4) == pytest.approx(6e-4 + 1.5e6 / 1e9)
    prof = hand_profile()
    layouts = [Layout(dp=2), Layout(pp=2, schedule="gpipe", microbatches=2, partition=(2, 2)),
               Layout(pp=2, schedule="gpipe", microbatches=8, partition=(2, 2))]
    ests = [predict(layout, prof, FAST, global_batch=32) for layout in layouts]
    truth = Calibration(step_s=0.05, action_s=0.002)
    cal = fit_calibration(ests, [e.step_s + truth.seconds(e.layout) for e in ests])
    assert cal.step_s == pytest.approx(0.05) and cal.action_s == pytest.approx(0.002)
    assert cal.compute_scale == 1.0  # three layouts: the compute scale is not fitted
    again = predict(layouts[1], prof, FAST, global_batch=32, calibration=cal)
    assert again.step_s == pytest.approx(ests[1].step_s + 0.05 + 0.002 * 4)
    layouts += [Layout(dp=4), Layout(pp=4, schedule="1f1b", microbatches=4, partition=(1, 1, 1, 1)),
                Layout(dp=2, pp=2, schedule="gpipe", microbatches=4, partition=(2, 2))]
    world = [predict(layout, prof, SLOW, global_batch=32) for layout in layouts]
    truth = Calibration(step_s=0.03, action_s=0.001, compute_scale=1.3)
    measured = [predict(layout, prof, SLOW, global_batch=32, calibration=truth).step_s for layout in layouts]
    assert fit_calibration(world, measured).compute_scale == 1.0  # not fitted unless asked
    cal = fit_calibration(world, measured, fit_compute_scale=True)
    assert (cal.step_s, cal.action_s, cal.compute_scale) == pytest.approx((0.03, 0.001, 1.3))


# ---- profile of a real network -------------------------------------------------------------------------
def _tiny_net():
    torch.manual_seed(0)
    return CaseStudyCNN(conv_filters=4, fc_width=8, image_size=16)


def test_profile_measures_every_layer_and_round_trips():
    net = _tiny_net()
    prof = profile_model(net, torch.randn(1, 3, 16, 16), microbatch_sizes=(1, 2), repeats=1, world_size=2)
    assert prof.num_layers == len(net)
    for layer, block in zip(prof.layers, net):
        assert layer.param_bytes == sum(p.numel() * 4 for p in block.parameters())
        assert set(layer.forward_s) == {1, 2} and all(v > 0 for v in layer.forward_s.values())
        assert layer.saved_bytes + layer.input_shared > 0 and 2 in layer.tp  # the last saves only its input
    x = torch.randn(1, 3, 16, 16)
    for layer, block in zip(prof.layers, net):
        x = block(x)
        assert layer.out_bytes == x.numel() * 4
    again = ModelProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again == prof
    assert "| layer | name |" in str(prof)


def test_profile_times_the_layers_in_rounds():
    """Every round runs every layer at every size in training's order, so a pause of the machine costs one
    round of all the layers (dropped by the median), not every sample of one layer."""
    calls: list[tuple[int, int]] = []

    class Logged(torch.nn.Linear):
        def forward(self, x):
            calls.append((self.index, x.shape[0]))
            return super().forward(x)

    net = torch.nn.Sequential(*[Logged(4, 4) for _ in range(3)])
    for i, layer in enumerate(net):
        layer.index = i
    profile_model(net, torch.randn(1, 4), microbatch_sizes=(1, 2), repeats=3, warmup=1, tp_degrees=[])
    one_round = [(layer, b) for layer in range(3) for b in (1, 2)]
    text = repr(calls)
    assert repr(one_round * 4)[1:-1] in text, calls  # warm-up + 3 rounds, back to back


def test_a_tensor_two_layers_save_is_held_once_except_across_a_stage_cut():
    """Layer 0 ends in a ReLU, which saves its output; layer 1's Linear saves the same tensor as its input."""
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU()),
                              torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh()))
    prof = profile_model(net, torch.randn(1, 8), microbatch_sizes=(1, 4), repeats=1, world_size=2, tp_degrees=[])
    first, second = prof.layers
    assert first.saved_bytes == 8 * 4 + 32 * 4  # Linear's input, ReLU's output
    assert second.input_shared == 32 * 4  # its Linear's input: the ReLU's output, counted in layer 0
    assert second.saved_bytes == 32 * 4  # Tanh's output only
    assert second.leaf_saved == [0, 32 * 4]

    def m4(layout):
        est = predict(layout, prof, FAST, global_batch=4)
        return {t.symbol: t.value for t in est.memory_terms}["M_4"]

    whole = m4(Layout(dp=1))  # inputs: the batch (4 x 8 floats) stays in M_4's input buffer
    assert whole == pytest.approx(4 * (8 * 4 + 32 * 4 + 32 * 4) + 4 * 8 * 4)
    # cut between the layers: rank 1's Linear saves the received activation, and nobody else holds it there.
    # Rank 1, 4 samples: Linear's input 128 + Tanh's output 128 saved, receive buffer 128 + its output 128
    import dataclasses

    apart = Layout(pp=2, schedule="gpipe", microbatches=1, partition=(1, 1))
    unshared = dataclasses.replace(prof, layers=[first, dataclasses.replace(second, input_shared=0)])
    assert m4(apart) == pytest.approx(4 * (128 + 128 + 128 + 128))
    assert {t.symbol: t.value for t in predict(apart, unshared, FAST, global_batch=4).memory_terms}["M_4"] == \
        pytest.approx(4 * (128 + 128 + 128))
    assert ModelProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


def test_tensor_parallel_bytes_add_up_to_the_plan():
    from lightning_distnn.parallel.tensor import comm_bytes, plan_tp

    net = _tiny_net()
    prof = profile_model(net, torch.randn(1, 3, 16, 16), microbatch_sizes=(1,), repeats=1, tp_degrees=[2])
    batch = 6
    whole = comm_bytes(plan_tp(net, 2), {leaf.name: (leaf.in_numel * batch, leaf.out_numel * batch)
                                          for layer in prof.layers for leaf in layer.leaves})["sent"]
    assert whole > 0
    assert sum(layer.tp[2].bytes_per_sample for layer in prof.layers) * batch == pytest.approx(whole, rel=1e-6)
    # the modules whose input is sharded are those the plan feeds a shard (what they save splits over the ranks)
    sharded_in = {name for layer in prof.layers for name in layer.tp[2].sharded_in}
    assert sharded_in == {e.name for e in plan_tp(net, 2).entries if e.input != "replicate"} != set()


def test_second_plan_reads_the_cache(tmp_path, monkeypatch):
    import lightning_distnn.planner.plan as plan_module

    calls = []
    real = plan_module.profile_model
    monkeypatch.setattr(plan_module, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = _tiny_net()
    x = torch.randn(1, 3, 16, 16)
    first = plan_layout(net, x, world_size=2, global_batch=8, cache_dir=tmp_path, repeats=1, microbatch_sizes=(1, 2))
    second = plan_layout(net, x, world_size=2, global_batch=8, cache_dir=tmp_path, repeats=1, microbatch_sizes=(1, 2))
    assert len(calls) == 1
    assert second.best.layout == first.best.layout and second.best.step_s == pytest.approx(first.best.step_s)
    assert "cache" in second.notes[-1]
    plan_layout(net, x, world_size=4, global_batch=8, cache_dir=tmp_path, repeats=1, microbatch_sizes=(1, 2))
    assert len(calls) == 2  # another world size is another key
    assert math.isfinite(first.best.images_per_s)


# ---- memory ----------------------------------------------------------------------------------
def test_in_flight_follows_the_schedules():
    from lightning_distnn.planner.cost import in_flight

    gpipe = Layout(pp=2, schedule="gpipe", microbatches=8, partition=(2, 2))
    assert in_flight(gpipe, 0) == {0: 8} and in_flight(gpipe, 1) == {1: 8}
    one = Layout(pp=4, schedule="1f1b", microbatches=8, partition=(1, 1, 1, 1))
    assert [in_flight(one, r) for r in range(4)] == [{0: 4}, {1: 3}, {2: 2}, {3: 1}]
    # interleaved, p=2, v=2, m=4 (rounds of 2): rank 0 warms up with (v-1) 2 + 2 (p-1) = 4 chunk-forwards,
    # then one more forward before its first backward: stage 0 twice, stage 2 twice, stage 0 again
    inter = Layout(pp=2, schedule="interleaved_1f1b", microbatches=4, partition=(1, 1, 1, 1), stages_per_rank=2)
    assert in_flight(inter, 0) == {0: 3, 2: 2} and in_flight(inter, 1) == {1: 2, 3: 1}
    # the runtime's order on rank 0 is F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 ...: after F0.3 stage 0 holds 4
    # micro-batches and stage 2 one; when stage 0's are the heavy ones, that is the peak (3 + 2 undercounted it)
    assert in_flight(inter, 0, {0: 10.0, 2: 1.0}) == {0: 4, 2: 1}


def _conv_relu_and_head(*, param_bytes: int, out_bytes: int) -> tuple:
    """A layer of two leaves (a conv saving 40 bytes per sample, a ReLU saving 400) and a head saving 100."""
    from lightning_distnn.planner import Leaf

    layer = LayerProfile(index=0, name="L0", forward_s={1: MS}, backward_s={1: MS}, param_bytes=param_bytes,
                         out_bytes=out_bytes, saved_bytes=440,
                         leaves=[Leaf("0.0", "Conv2d", 10, 100), Leaf("0.1", "ReLU", 100, 100)], leaf_saved=[40, 400])
    head = LayerProfile(index=1, name="L1", forward_s={1: MS}, backward_s={1: MS}, param_bytes=0, out_bytes=10,
                        saved_bytes=100)
    return layer, head


def test_backward_peak_sweeps_the_leaves():
    """M_6: at leaf k the saved tensors up to k are alive with k's output and input gradients."""
    layer, head = _conv_relu_and_head(param_bytes=0, out_bytes=100)
    prof = ModelProfile(layers=[layer, head], input_bytes=40)
    terms = {t.symbol: t.value for t in predict(Layout(), prof, FAST, global_batch=2).memory_terms}
    # all saved: 40 + 400 + 100 = 540 bytes per sample; at the ReLU (100 float32 in, 100 out): 40 + 400 saved
    # + 400 output gradient + 400 input gradient = 1240
    assert terms["M_4"] == pytest.approx((540 + 40) * 2)  # + the input batch
    assert terms["M_6"] == pytest.approx((1240 - 540) * 2)


def test_tensor_parallel_activations_split_only_where_the_input_is_sharded():
    """M_4 under tp: a column-wise layer keeps its replicated input whole; what follows it on the shard splits."""
    from lightning_distnn.planner import TPCost

    layer, head = _conv_relu_and_head(param_bytes=800, out_bytes=400)
    layer.tp[2] = TPCost(sharded=1.0, bytes_per_sample=0.0, collectives=1, out_sharded=True, sharded_in=["0.1"])
    head.tp[2] = TPCost(sharded=0.0, bytes_per_sample=0.0, collectives=0, out_sharded=False)
    prof = ModelProfile(layers=[layer, head], input_bytes=40)
    terms = {t.symbol: t.value for t in predict(Layout(tp=2), prof, FAST, global_batch=2).memory_terms}
    # per sample: the conv's 40 saved bytes (its replicated input) whole, the ReLU's 400 on the shard halved, the
    # replicated head's 100 whole, and the input batch (40)
    assert terms["M_4"] == pytest.approx((40 + 200 + 100 + 40) * 2)
    # a profile from before the per-leaf shards (sharded_in empty on a sharded layer): the old rule, all halved
    layer.tp[2] = TPCost(sharded=1.0, bytes_per_sample=0.0, collectives=1, out_sharded=True)
    terms = {t.symbol: t.value for t in predict(Layout(tp=2), prof, FAST, global_batch=2).memory_terms}
    assert terms["M_4"] == pytest.approx((220 + 100 + 40) * 2)


def test_predicted_memory_is_within_15_percent_of_a_real_training_step():
    """One process, a real Lightning step: the heap's peak (MemoryProbe) against M = sum of M_i."""
    from lightning_distnn.models import ImageClassifier
    from lightning_distnn.planner.measure import MemoryProbe, heap_in_use
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    if heap_in_use() < 0:
        pytest.skip("needs glibc's mallinfo2 to read the heap")
    torch.manual_seed(0)
    net = CaseStudyCNN(conv_filters=32, fc_width=128, image_size=32)
    prof = profile_model(net, torch.randn(1, 3, 32, 32), microbatch_sizes=(32,), repeats=1, tp_degrees=())
    predicted = predict(Layout(), prof, FAST, global_batch=32)
    probe = MemoryProbe(step_index=1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    trainer = quiet_trainer("auto", devices=1, max_steps=2, callbacks=[probe])
    trainer.fit(ImageClassifier(net, num_classes=10), datamodule=FixedDataModule(x, y, 32))
    assert probe.peak > 0
    assert abs(predicted.memory_bytes - probe.peak) / probe.peak < 0.15, (predicted.seed_form(), probe.peak)


def test_optimizer_states_are_counted_on_the_optimizer():
    from lightning_distnn.planner.profile import optimizer_states_of

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert [optimizer_states_of(o) for o in (
        torch.optim.SGD(p, lr=0.1), torch.optim.SGD(p, lr=0.1, momentum=0.9), torch.optim.Adam(p),
        torch.optim.Adam(p, amsgrad=True), torch.optim.AdamW(p), torch.optim.RMSprop(p, momentum=0.9, centered=True),
    )] == [0, 1, 2, 3, 2, 3]
