"""HybridStrategy: dp x pp x tp equivalence with one process; resharding checkpoints; errors."""

import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import DataParallelStrategy, HybridStrategy, PipelineStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    cpu_state_dict,
    digits_tensors,
    quiet_trainer,
    reference_epochs,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 3, 16
LAYOUTS = {  # name -> HybridStrategy kwargs (4 processes each)
    "dp2xpp2": dict(dp=2, pp=2, tp=1, microbatches=2, partition="uniform"),
    "dp2xtp2": dict(dp=2, pp=1, tp=2),
    "pp2xtp2": dict(dp=1, pp=2, tp=2, microbatches=2, partition="uniform"),
    # clipping by the whole model's norm with dp > 1 (norm over the stages, after the dp average)
    "dp2xpp2_clip": dict(dp=2, pp=2, tp=1, microbatches=2, partition="uniform"),
    # ... and over the stages' tensor-parallel shards, each counted once
    "pp2xtp2_clip": dict(dp=1, pp=2, tp=2, microbatches=2, partition="uniform"),
    # ... and, without a pipeline, Lightning's own clipping over DTensor and plain gradients
    "dp2xtp2_clip": dict(dp=2, pp=1, tp=2),
}
CLIP = {"dp2xpp2_clip": 0.05, "pp2xtp2_clip": 0.05, "dp2xtp2_clip": 0.05}
# every rank builds the model from its own seed (as an unseeded script under Lightning's launcher does):
# the replicas must still start from one initialisation, that of the ranks at dp = tp = 0
LAYOUTS.update({
    "dp2xpp2_own_seeds": dict(dp=2, pp=2, tp=1, microbatches=2, partition="uniform"),
    "dp2xtp2_own_seeds": dict(dp=2, pp=1, tp=2),
})


def _local_state(strategy, module):
    """This rank's layers, DTensors gathered to full tensors, and the data-parallel replica it belongs to."""
    from torch.distributed.tensor import DTensor

    local = {}
    for name, value in module.net.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        local[name] = value.detach().cpu().clone()
    return {"replica": strategy.distributed_sampler_kwargs["rank"], "state": local}


def _replicas(per_rank):
    """{dp replica: the unsplit network merged from that replica's ranks}; tp peers must hold equal tensors."""
    merged: dict = {}
    for result in per_rank:
        replica = merged.setdefault(result["replica"], {})
        for name, value in result["state"].items():
            if name in replica:
                assert torch.equal(replica[name], value), f"replica {result['replica']}: ranks disagree on {name}"
            replica[name] = value
    return merged


def _train_layouts(rank, world_size, layouts):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    out = {}
    for name in layouts:
        kwargs = LAYOUTS[name]
        pp, tp = kwargs["pp"], kwargs["tp"]
        first = rank // (pp * tp) == 0 and rank % tp == 0  # dp = tp = 0 on the (dp, pp, tp) mesh
        module = tiny_classifier(seed=0 if first or not name.endswith("_own_seeds") else 100 + rank)
        strategy = HybridStrategy(timeout=60, **kwargs)
        trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS, gradient_clip_val=CLIP.get(name))
        trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // kwargs["dp"]))
        out[name] = _local_state(strategy, module)
        dims = strategy.parallel_dims
        out[name + "/dims"] = (dims.dp, dims.pp, dims.tp)
    return out


@pytest.mark.slow
def test_hybrid_layouts_match_single_process():
    results = run_distributed(_train_layouts, 4, list(LAYOUTS), timeout=500)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    expected = reference_train(tiny_classifier(seed=0), x, y, GLOBAL_BATCH, STEPS)
    from tests.test_pipeline import _reference_with_clip

    clipped = {k: v.detach() for k, v in _reference_with_clip(STEPS, 0.05)[0].net.state_dict().items()}
    assert max((clipped[k] - expected[k]).abs().max().item() for k in expected) > 1e-4  # the clip bites
    for name, kwargs in LAYOUTS.items():
        want = clipped if name in CLIP else expected
        for result in results:
            assert result[name + "/dims"] == (kwargs["dp"], kwargs["pp"], kwargs["tp"])
        replicas = _replicas([result[name] for result in results])
        assert sorted(replicas) == list(range(kwargs["dp"])), (name, sorted(replicas))
        for replica, state in replicas.items():  # every replica, replica 0 included
            try:
                assert_state_dicts_close(state, want, atol=1e-5)
            except AssertionError as err:
                raise AssertionError(f"layout {name}, dp replica {replica}: {err}") from None


# ---- resharding: save under one layout, resume under another ------------------------------
EPOCH_SAMPLES = 32  # 2 steps of 16 per epoch


def _reference_two_epochs(epochs=2, **cnn):
    """One process, SGD with momentum, ``epochs`` epochs of 2 steps in the sampler's order."""
    x, y = digits_tensors(EPOCH_SAMPLES)
    return reference_epochs(tiny_classifier(seed=0, **cnn), x, y, GLOBAL_BATCH, epochs)


def _train_first_epoch_and_save(rank, world_size, path, kwargs, strategy_cls=HybridStrategy):
    x, y = digits_tensors(EPOCH_SAMPLES)
    module = tiny_classifier(seed=0)
    trainer = quiet_trainer(strategy_cls(timeout=60, **kwargs), devices=world_size, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // kwargs.get("dp", 1)))
    trainer.save_checkpoint(path)
    return trainer.global_step


def _resume_data_parallel(rank, world_size, path):
    x, y = digits_tensors(EPOCH_SAMPLES)
    module = tiny_classifier(seed=123)  # other initial weights: everything must come from the checkpoint
    strategy = DataParallelStrategy(timeout=60)
    trainer = quiet_trainer(strategy, devices=world_size, max_epochs=2, max_steps=-1)
    trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // world_size), ckpt_path=path)
    return trainer.global_step, cpu_state_dict(module.net)


@pytest.mark.slow
def test_hybrid_checkpoint_resumes_as_data_parallel(tmp_path):
    path = str(tmp_path / "hybrid_dp2_pp2")
    steps = run_distributed(
        _train_first_epoch_and_save, 4, path, dict(dp=2, pp=2, microbatches=2, partition="uniform"), timeout=300
    )
    assert steps == [2] * 4
    results = run_distributed(_resume_data_parallel, 2, path, timeout=300)
    expected = _reference_two_epochs()
    for global_step, state in results:
        assert global_step == 4
        assert_state_dicts_close(state, expected, atol=1e-5)


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_in_one_process(tmp_path):
    path = str(tmp_path / "pp2")
    run_distributed(
        _train_first_epoch_and_save, 2, path, dict(pp=2, microbatches=2, partition="uniform"), PipelineStrategy,
        timeout=300,
    )
    # one process, no process group: Lightning's single-device strategy cannot read DCP, ours can
    results = run_distributed(_resume_data_parallel, 1, path, timeout=300)
    global_step, state = results[0]
    assert global_step == 4
    assert_state_dicts_close(state, _reference_two_epochs(), atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------
def test_layout_not_fitting_devices_names_numbers():
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match=r"dp=2, pp=2, tp=2.*world_size=4"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=HybridStrategy(dp=2, pp=2, tp=2), logger=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sync="parameter_server"), "parameter server"),
        (dict(sync="local_sgd"), "local SGD"),
        (dict(compression="powersgd"), "DDP communication hook"),
        (dict(compression="zip"), "valid: None, 'fp16', 'bf16'"),
        (dict(tp=0), "tp=0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridStrategy(**kwargs)


def test_registered():
    import lightning.pytorch as pl

    assert "distnn_hybrid" in pl.strategies.StrategyRegistry.available_strategies()


def test_teardown_after_a_failed_step_keeps_that_error(monkeypatch, caplog):
    """Lightning tears down inside its except block; moving DTensor parameters to the CPU can fail there
    (the traceback still references them) and must not replace the user's error."""
    from lightning_distnn.strategies.base import MeshStrategy

    def cannot_swap(self):
        raise RuntimeError("_apply(): Couldn't swap Linear.weight")

    monkeypatch.setattr(MeshStrategy, "teardown", cannot_swap)
    strategy = HybridStrategy(tp=2)
    with pytest.raises(ValueError, match="the user's step failed"):
        try:
            raise ValueError("the user's step failed")
        except ValueError:
            strategy.teardown()
            raise
    assert "teardown after ValueError: _apply(): Couldn't swap" in caplog.text
    with pytest.raises(RuntimeError, match="Couldn't swap"):  # without an error in flight it is not hidden
        strategy.teardown()
