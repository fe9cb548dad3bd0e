"""Tensor-parallel and hybrid paths beside the main equivalence tests: a user plan through the Trainer
(TensorParallelStrategy(plan=...) and HybridStrategy(tp_plan=...)), resume tp=1 -> tp=2 through
Lightning, fp16/bf16 on the hybrid's data-parallel all-reduce."""

from torch.distributed.tensor import DTensor

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import HybridStrategy, TensorParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    digits_tensors,
    quiet_trainer,
    reference_epochs,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 3, 16
USER_PLAN = {"6.0": "replicate", "7.0": "replicate"}  # the automatic plan shards them colwise / rowwise


def _full(module):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in module.net.state_dict().items()}


def _local_shapes(module):
    return {k: tuple((v.to_local() if isinstance(v, DTensor) else v).shape) for k, v in module.net.state_dict().items()}


def _paths(rank, world_size, ckpt):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    data = FixedDataModule(x, y, GLOBAL_BATCH)
    out = {}
    for name, strategy in (("tp_plan", TensorParallelStrategy(tp=2, plan=USER_PLAN, timeout=60)),
                           ("hybrid_plan", HybridStrategy(dp=1, pp=1, tp=2, tp_plan=USER_PLAN, timeout=60))):
        module = tiny_classifier(seed=0)
        quiet_trainer(strategy, devices=world_size, max_steps=STEPS).fit(module, datamodule=data)
        out[name] = (_full(module), _local_shapes(module))
    for name in ("fp16", "bf16"):
        module = tiny_classifier(seed=0)
        strategy = HybridStrategy(dp=2, pp=1, tp=1, compression=name, timeout=60)
        quiet_trainer(strategy, devices=world_size, max_steps=STEPS).fit(
            module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // 2))
        out[name] = _full(module)

    # tp=1 (two data-parallel replicas) saves after one epoch; tp=2 resumes from it with other initial weights
    epoch = FixedDataModule(*digits_tensors(32), 16)
    module = tiny_classifier(seed=0)
    trainer = quiet_trainer(TensorParallelStrategy(tp=1, timeout=60), devices=world_size, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=FixedDataModule(*digits_tensors(32), 8))
    trainer.save_checkpoint(ckpt)
    module = tiny_classifier(seed=123)
    trainer = quiet_trainer(TensorParallelStrategy(tp=2, timeout=60), devices=world_size, max_epochs=2, max_steps=-1)
    trainer.fit(module, datamodule=epoch, ckpt_path=ckpt)
    out["resumed"] = (trainer.global_step, _full(module))
    return out


def test_tp_and_hybrid_paths(tmp_path):
    results = run_distributed(_paths, 2, str(tmp_path / "tp1"), timeout=500)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    expected = reference_train(tiny_classifier(seed=0), x, y, GLOBAL_BATCH, STEPS)
    initial = tiny_classifier(seed=0).net.state_dict()
    movement = {k: (expected[k] - initial[k]).abs().max().item() for k in expected}
    two_epochs = reference_epochs(tiny_classifier(seed=0), *digits_tensors(32), 16, 2)
    for r in results:
        for name in ("tp_plan", "hybrid_plan"):
            state, shapes = r[name]
            assert_state_dicts_close(state, expected, atol=1e-5)
            # the user's plan was applied: the two last Linear layers whole on each rank, the others sharded
            assert shapes["6.0.weight"] == (16, 16) and shapes["7.0.weight"] == (10, 16), (name, shapes)
            assert shapes["0.0.weight"][0] == 4, (name, shapes)  # colwise: 8 filters, 4 per rank
        for name, fraction in (("fp16", 0.01), ("bf16", 0.05)):
            relative = max((r[name][k] - expected[k]).abs().max().item() / movement[k] for k in expected)
            assert 0 < relative < fraction, (name, relative)
        assert r["resumed"][0] == 4
        assert_state_dicts_close(r["resumed"][1], two_epochs, atol=1e-5)
    for name in ("fp16", "bf16"):
        assert_state_dicts_close(results[1][name], results[0][name], atol=0.0)
