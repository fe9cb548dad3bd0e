"""Bytes on the wire, counted at torch.distributed (lightning_distnn.testing.wire), against what the
package reports (comm_bytes_per_step) and against sizes worked out here from the model's shapes.

Not measurable this way: DDP's built-in all-reduce (no Python hook: C++ calls gloo directly); its
count stays analytic (test_comm_accounting.py)."""

import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import DataParallelStrategy, PipelineStrategy, TensorParallelStrategy
from lightning_distnn.testing import run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer, tiny_classifier
from lightning_distnn.testing.wire import WireCounter, step_window

pytestmark = pytest.mark.xdist_group("test_wire")  # its tests share a module fixture: one worker

STEPS, GLOBAL_BATCH, MICRO, WINDOW = 4, 16, 4, 2  # the window: the third step (past PowerSGD's 2 plain steps)


RUNS = {
    "fp16": lambda: DataParallelStrategy(timeout=60, compression="fp16"),
    "topk": lambda: DataParallelStrategy(timeout=60, compression="topk", topk_ratio=0.05),
    "powersgd": lambda: DataParallelStrategy(timeout=60, compression="powersgd", powersgd_rank=2, powersgd_start_iter=2),
    "ps": lambda: DataParallelStrategy(sync="parameter_server", timeout=60, num_servers=1),
    "1f1b": lambda: PipelineStrategy(schedule="1f1b", microbatches=MICRO, partition="uniform", timeout=60),
    "interleaved": lambda: PipelineStrategy(schedule="interleaved_1f1b", microbatches=MICRO, partition="uniform", timeout=60),
    "tp": lambda: TensorParallelStrategy(timeout=60),
}


def _measure(rank, world_size):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    out = {}
    for name, make in RUNS.items():
        strategy = make()
        window = step_window(WINDOW, functional=name == "tp")
        module = tiny_classifier(seed=0, conv_filters=4)
        batch = GLOBAL_BATCH // world_size if isinstance(strategy, DataParallelStrategy) else GLOBAL_BATCH
        trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS, callbacks=[window])
        whole = WireCounter()
        if name == "ps":  # the server thread replies after the worker's step ended: count the whole fit
            with whole:
                trainer.fit(module, datamodule=FixedDataModule(x, y, batch))
        else:
            trainer.fit(module, datamodule=FixedDataModule(x, y, batch))
        plan = strategy.pipeline.plan.counts if isinstance(strategy, PipelineStrategy) else None
        out[name] = {"window": window.wire.calls(), "whole": whole.calls(), "reported": strategy.comm_bytes_per_step(),
                     "plan": plan}
    return out


def _bytes(calls, *ops):
    return sum(c.nbytes for c in calls if c.op in ops)


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 2, timeout=500)


def test_dp_hooks_hand_over_what_they_report(measured):
    module = tiny_classifier(seed=0, conv_filters=4)
    shapes = [p.shape for p in module.parameters()]
    numel = sum(p.numel() for p in module.parameters())
    # PowerSGD, rank 2, min rate 2: an n x m gradient (n = first dim) goes as P (n x 2) and Q (m x 2) when
    # that is at least 2x smaller, else whole; 1-D tensors whole
    factors, whole = 0, 0
    for s in shapes:
        n, m = s[0], s.numel() // s[0]
        r = min(n, m, 2)
        if len(s) > 1 and 2 * r * (n + m) < n * m:
            factors += r * (n + m)
        else:
            whole += n * m
    for res in measured:
        assert _bytes(res["fp16"]["window"], "all_reduce") == 2 * numel == res["fp16"]["reported"]["payload"]
        k = max(1, int(numel * 0.05))
        assert _bytes(res["topk"]["window"], "all_gather") == 8 * k == res["topk"]["reported"]["payload"]
        assert _bytes(res["powersgd"]["window"], "all_reduce") == 4 * (factors + whole)
        # reported: the average over 2 plain steps and 2 compressed ones
        assert res["powersgd"]["reported"]["payload"] == pytest.approx((2 * 4 * numel + 2 * 4 * (factors + whole)) / STEPS)


def test_parameter_server_point_to_point_bytes(measured):
    numel = sum(p.numel() for p in tiny_classifier(seed=0, conv_filters=4).parameters())
    for res in measured:
        calls, reported = res["ps"]["whole"], res["ps"]["reported"]
        assert _bytes(calls, "isend") == pytest.approx(reported["sent"] * STEPS)
        assert _bytes(calls, "recv", "irecv") == pytest.approx(reported["received"] * STEPS)
    # rank 1 pushes header (16 B) + fp32 gradients each step and a STOP header at the end, and pulls fp32 values
    worker = measured[1]["ps"]["whole"]
    assert _bytes(worker, "isend") == STEPS * (16 + 4 * numel) + 16
    assert _bytes(worker, "irecv") == STEPS * 4 * numel


def test_pipeline_stage_boundaries(measured):
    x, _ = digits_tensors(GLOBAL_BATCH)
    net = tiny_classifier(seed=0, conv_filters=4).net
    for name, stages_per_rank in (("1f1b", 1), ("interleaved", 2)):
        counts = measured[0][name]["plan"]
        bounds = [sum(counts[: i + 1]) for i in range(len(counts) - 1)]  # layer index after each stage
        with torch.no_grad():
            sizes = [4 * torch.nn.Sequential(*list(net)[:b])(x[: GLOBAL_BATCH // MICRO]).numel() for b in bounds]  # bytes / micro-batch
        # stage i sits on rank i % 2: it sends its output forward and receives its input's gradient back
        for rank, res in enumerate(measured):
            sent = sum(MICRO * sizes[i] for i in range(len(bounds)) if i % 2 == rank)  # activations out
            sent += sum(MICRO * sizes[i] for i in range(len(bounds)) if (i + 1) % 2 == rank)  # gradients back
            if (len(counts) - 1) % 2 == rank:  # the last stage shares the network's output with the other rank
                with torch.no_grad():
                    sent += 4 * net(x).numel()
            window, reported = res[name]["window"], res[name]["reported"]
            assert _bytes(window, "isend") == sent == reported["sent"], (name, rank)
            assert _bytes(window, "irecv") == reported["received"], (name, rank)


def test_tensor_parallel_collectives(measured):
    for res in measured:
        window, reported = res["tp"]["window"], res["tp"]["reported"]
        # tp=2: a ring all-reduce of n bytes moves 2 (2-1)/2 n = n per rank; an all-gather of an n-byte share n;
        # a reduce-scatter of n bytes n/2
        traffic = _bytes(window, "all_reduce", "functional.all_reduce", "all_gather_into_tensor",
                         "functional.all_gather_into_tensor", "all_gather")
        traffic += _bytes(window, "reduce_scatter_tensor", "functional.reduce_scatter_tensor") / 2
        assert traffic > 0
        assert traffic == pytest.approx(reported["sent"])
