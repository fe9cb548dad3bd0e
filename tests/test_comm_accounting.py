"""Communication accounting: the counted bytes per step equal the analytic payload of each mode."""

from functools import partial

import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.parallel.accounting import CommCounter, powersgd_values, ring_allreduce_bytes, topk_values
from lightning_distnn.strategies import DataParallelStrategy
from lightning_distnn.testing import run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer, tiny_classifier

STEPS, BATCH = 4, 8
RUNS = {
    "allreduce": {},
    "fp16": {"compression": "fp16"},
    "powersgd": {"compression": "powersgd", "powersgd_rank": 2, "powersgd_start_iter": 2},
    "topk": {"compression": "topk", "topk_ratio": 0.05},
    "ps": {"sync": "parameter_server", "num_servers": 1},
    "local_sgd": {"sync": "local_sgd", "local_sgd_period": 2, "local_sgd_warmup_steps": 1},
}


def _count(rank, world_size):
    out = {}
    x, y = digits_tensors(STEPS * BATCH * world_size)
    for name, kwargs in RUNS.items():
        module = tiny_classifier(seed=0, conv_filters=4)
        module.optimizer_factory = partial(torch.optim.SGD, lr=0.05)
        strategy = DataParallelStrategy(timeout=60, **kwargs)
        trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS, log_every_n_steps=1)
        trainer.fit(module, datamodule=FixedDataModule(x, y, BATCH))
        out[name] = dict(strategy.comm_bytes_per_step())
        out[name]["logged_sent"] = float(trainer.callback_metrics["comm/bytes_sent_per_step"])
        if name == "powersgd":
            ps = strategy._hook_state.powersgd
            out[name]["torch_pq_values"] = sum(t.numel() for t in ps.p_memory_dict.values()) + sum(
                t.numel() for t in ps.q_memory_dict.values()
            )
    return out


def test_counts_match_analytic_payloads():
    world = 2
    results = run_distributed(_count, world, timeout=300)
    module = tiny_classifier(seed=0, conv_filters=4)
    shapes = [p.shape for p in module.parameters()]
    numel = sum(p.numel() for p in module.parameters())
    dense = 4.0 * numel
    for rank, res in enumerate(results):
        # plain all-reduce: the whole fp32 gradient, ring traffic 2 (W-1)/W of it
        assert res["allreduce"]["payload"] == pytest.approx(dense)
        assert res["allreduce"]["sent"] == pytest.approx(ring_allreduce_bytes(dense, world))
        assert res["allreduce"]["received"] == pytest.approx(res["allreduce"]["sent"])
        assert res["allreduce"]["logged_sent"] == pytest.approx(res["allreduce"]["sent"])
        assert res["fp16"]["payload"] == pytest.approx(dense / 2)
        # PowerSGD: 2 plain steps, then r (n + m) values per compressible n x m gradient
        compressed = 4.0 * powersgd_values(shapes, rank=2, min_compression_rate=2.0)
        assert res["powersgd"]["payload"] == pytest.approx((2 * dense + 2 * compressed) / STEPS)
        uncompressed_values = 0
        factor_values = 0
        for s in shapes:
            n, m = s[0], s.numel() // s[0]
            r = min(n, m, 2)
            if len(s) >= 2 and (n + m) * r * 2.0 < n * m:
                factor_values += r * (n + m)
            else:
                uncompressed_values += n * m
        assert res["powersgd"]["torch_pq_values"] == factor_values  # what torch allocated and all-reduced
        assert compressed == pytest.approx(4.0 * (factor_values + uncompressed_values))
        assert compressed < dense
        # top-k: k fp32 values + k int32 indices, all-gathered
        k = topk_values(numel, 0.05)
        assert res["topk"]["payload"] == pytest.approx(8.0 * k)
        assert res["topk"]["sent"] == pytest.approx(8.0 * k * (world - 1))
        # local SGD: step 1 all-reduces gradients; steps 3 averages parameters (period 2 after warm-up 1)
        assert res["local_sgd"]["payload"] == pytest.approx(2 * dense / STEPS)
    # parameter server (server on rank 0): rank 1 pushes a 16-byte header + fp32 gradients and pulls fp32
    # parameters, and sends one 16-byte STOP at the end; rank 0's server receives those and sends the
    # replies; rank 0's own worker talks to it in memory
    ps0, ps1 = results[0]["ps"], results[1]["ps"]
    assert ps1["sent"] == pytest.approx(16 + dense + 16 / STEPS) and ps1["received"] == pytest.approx(dense)
    assert ps0["sent"] == pytest.approx(dense) and ps0["received"] == pytest.approx(16 + dense + 16 / STEPS)


def test_counter_averages_per_step():
    c = CommCounter()
    c.allreduce(100, 4)
    c.step()
    c.add(sent=10, received=20)
    c.step()
    stats = c.per_step()
    assert stats["sent"] == pytest.approx((150 + 10) / 2)
    assert stats["received"] == pytest.approx((150 + 20) / 2)
    assert stats["steps"] == 2
