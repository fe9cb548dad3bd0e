"""PipelineStrategy: every schedule equals one process; logging, clipping, eval, checkpoints; bad input."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_distnn  # noqa: F401
from lightning_distnn.models import ImageClassifier
from lightning_distnn.parallel.pipeline import (
    SCHEDULES,
    check_microbatches,
    local_stage_indices,
    schedule_class,
    stage_ranks,
    theoretical_bubble,
)
from lightning_distnn.strategies import PipelineStrategy
from lightning_distnn.checkpoint import load_distributed
from lightning_distnn.callbacks import RunStats
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.wire import step_window
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    digits_tensors,
    quiet_trainer,
    reference_epochs,
    reference_train,
    sampler_order,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH, MICRO = 3, 16, 4
EPOCH_SAMPLES = 32  # the checkpoint test: 2 steps per epoch
# (schedule, partition, gradient_clip_val): every schedule, 2 ranks, 2 stages per rank for looped/V ones
CASES = [
    ("gpipe", "uniform", None),
    ("1f1b", "balanced", None),
    ("interleaved_1f1b", "uniform", None),
    ("looped_bfs", [1, 3, 2, 2], None),
    ("interleaved_zero_bubble", "uniform", None),
    ("zbv_zero_bubble", "uniform", None),
    ("dualpipev", "uniform", None),
    ("1f1b", [3, 5], 0.05),
]


def _local_net_state(module):
    return {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()}


class _BuiltInConfigureModel(ImageClassifier):
    """Builds its network in Lightning's ``configure_model`` hook, as large models do."""

    def __init__(self, seed: int) -> None:
        super().__init__(net=None)
        self.seed = seed

    def configure_model(self) -> None:
        if self.net is None:
            self.net = tiny_classifier(seed=self.seed).net


def _train_every_schedule(rank, world_size, cases, ckpt_path):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH + GLOBAL_BATCH)
    results = {}
    for i, (schedule, partition, clip) in enumerate(cases):
        module = tiny_classifier(seed=0)
        strategy = PipelineStrategy(schedule=schedule, microbatches=MICRO, partition=partition, timeout=60)
        stats, window = RunStats(warmup_steps=1), step_window(STEPS - 1)  # the last step (no shape inference)
        trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS, gradient_clip_val=clip,
                                callbacks=[stats, window])
        trainer.fit(module, datamodule=FixedDataModule(x[: STEPS * GLOBAL_BATCH], y[: STEPS * GLOBAL_BATCH], GLOBAL_BATCH))
        last_step = strategy.pipeline.timeline.of_step()
        results[i] = {
            "state": _local_net_state(module),
            "loss": float(trainer.callback_metrics["train/loss"]),
            "stages": strategy.pipeline.stage_indices,
            "plan": strategy.pipeline.plan.counts,
            "bubble": strategy.pipeline_bubble(),
            "bytes": strategy.comm_bytes_per_step(),
            "tasks": sorted((r.stage, r.microbatch, r.kind) for r in last_step),
            "wire": (window.wire.bytes(["isend"]), window.wire.bytes(["irecv"])),
            "images": stats.images,
        }

    # a module that builds its network in Lightning's configure_model hook (it is None before): checked and
    # split after the hook, on every rank
    late = _BuiltInConfigureModel(seed=0)
    trainer = quiet_trainer(PipelineStrategy(schedule="1f1b", microbatches=MICRO, partition="uniform", timeout=60),
                            world_size, STEPS)
    trainer.fit(late, datamodule=FixedDataModule(x[: STEPS * GLOBAL_BATCH], y[: STEPS * GLOBAL_BATCH], GLOBAL_BATCH))
    results["configure_model"] = _local_net_state(late)

    # checkpoint after the first epoch (2 steps), resume from it (other initial weights, so everything must come
    # from the checkpoint) to the end of the second: the weights, the momentum and the loop's step all count
    data = FixedDataModule(x[:EPOCH_SAMPLES], y[:EPOCH_SAMPLES], GLOBAL_BATCH)
    module = tiny_classifier(seed=0)
    trainer = quiet_trainer(PipelineStrategy(schedule="1f1b", microbatches=MICRO, partition="uniform"), world_size,
                            -1, max_epochs=1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(ckpt_path)
    module = tiny_classifier(seed=123)
    strategy = PipelineStrategy(schedule="1f1b", microbatches=MICRO, partition="uniform")
    trainer = quiet_trainer(strategy, world_size, -1, max_epochs=2, limit_val_batches=1.0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    results["resumed"] = (trainer.global_step, _local_net_state(module))

    # the same pipeline checkpoint resumed into another layout: a hybrid with the layers sharded tp=2
    from torch.distributed.tensor import DTensor

    from lightning_distnn.strategies import HybridStrategy

    hybrid_module = tiny_classifier(seed=123)
    hybrid = quiet_trainer(HybridStrategy(dp=1, pp=1, tp=2, timeout=60), world_size, -1, max_epochs=2)
    hybrid.fit(hybrid_module, datamodule=data, ckpt_path=ckpt_path)
    results["hybrid_resumed"] = (hybrid.global_step, {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in hybrid_module.net.state_dict().items()
    })

    # evaluation loops on the trained pipeline: a batch of 10 does not split into 4 (padded in eval)
    evaluation = FixedDataModule(x[-GLOBAL_BATCH:][:10], y[-GLOBAL_BATCH:][:10], 10)
    results["val"] = trainer.validate(module, datamodule=evaluation, verbose=False)[0]
    results["test"] = trainer.test(module, datamodule=evaluation, verbose=False)[0]
    results["predict"] = torch.cat(trainer.predict(module, datamodule=evaluation))

    # a training batch that does not split into equal micro-batches is refused before any step
    module = tiny_classifier(seed=0)
    before = _local_net_state(module)
    trainer = quiet_trainer(PipelineStrategy(schedule="gpipe", microbatches=MICRO, partition="uniform"), world_size, 1)
    try:
        trainer.fit(module, datamodule=FixedDataModule(x[:10], y[:10], 10))
        results["uneven"] = "no error"
    except ValueError as err:
        results["uneven"] = str(err)
    results["uneven_untouched"] = all(torch.equal(before[k], v) for k, v in _local_net_state(module).items())
    return results


def _reference_with_clip(steps, clip):
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    order = sampler_order(len(x))
    x, y = x[order], y[order]
    ref = copy.deepcopy(tiny_classifier(seed=0))
    opt = ref.configure_optimizers()
    for step in range(steps):
        sl = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        opt.zero_grad()
        ref.loss_fn(ref(x[sl]), y[sl]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    following = slice(steps * GLOBAL_BATCH, (steps + 1) * GLOBAL_BATCH)  # the batch the next step sees
    return ref, (x[following], y[following])


@pytest.mark.slow
def test_every_schedule_matches_single_process(tmp_path):
    ckpt = str(tmp_path / "pipe.ckpt")
    per_rank = run_distributed(_train_every_schedule, 2, CASES, ckpt, timeout=420)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH + GLOBAL_BATCH)
    expected = reference_train(tiny_classifier(seed=0), x[: STEPS * GLOBAL_BATCH], y[: STEPS * GLOBAL_BATCH],
                               GLOBAL_BATCH, STEPS)
    initial = tiny_classifier(seed=0).net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"

    late = {k: v for r in per_rank for k, v in r["configure_model"].items()}
    assert_state_dicts_close(late, expected, atol=1e-5)

    for i, (schedule, partition, clip) in enumerate(CASES):
        merged = {}
        for r in per_rank:
            assert not set(merged) & set(r[i]["state"]), f"{schedule}: a layer is on two ranks"
            merged.update(r[i]["state"])
        if clip is None:
            want = expected
        else:
            ref, _ = _reference_with_clip(STEPS, clip)
            want = {k: v.detach() for k, v in ref.net.state_dict().items()}
            assert any((want[k] - expected[k]).abs().max() > 1e-4 for k in want), "clipping had no effect"
        try:
            assert_state_dicts_close(merged, want, atol=1e-5)
        except AssertionError as err:
            raise AssertionError(f"schedule={schedule}, partition={partition}, clip={clip}: {err}") from None
        # what training_step logged is the single-process loss of the last batch, on every rank
        ref, (xb, yb) = _reference_with_clip(STEPS - 1, clip)
        with torch.no_grad():
            want_loss = ref.loss_fn(ref(xb), yb).item()
        for r in per_rank:
            assert r[i]["loss"] == pytest.approx(want_loss, abs=1e-5), schedule
        per_rank_stages = [r[i]["stages"] for r in per_rank]
        if schedule in ("gpipe", "1f1b"):
            assert per_rank_stages == [[0], [1]]
        elif schedule in ("zbv_zero_bubble", "dualpipev"):
            assert per_rank_stages == [[0, 3], [1, 2]]
        else:
            assert per_rank_stages == [[0, 2], [1, 3]]
        if isinstance(partition, list):
            assert per_rank[0][i]["plan"] == partition
        stages_per_rank = 1 if schedule in ("gpipe", "1f1b") else 2
        for rank, r in enumerate(per_rank):
            want_theory = theoretical_bubble(schedule, 2, MICRO, stages_per_rank)  # nan where no closed form
            assert r[i]["bubble"]["theory"] == pytest.approx(want_theory, nan_ok=True)
            assert 0.0 <= r[i]["bubble"]["measured"] < 1.0
            # the bytes it reports are the bytes it handed to torch.distributed (isend/irecv), per step
            assert r[i]["wire"] == (r[i]["bytes"]["sent"], r[i]["bytes"]["received"]), (schedule, rank)
            # the last step ran one forward and a backward (B, or I and W) of every micro-batch on each local stage
            tasks = r[i]["tasks"]
            for stage in per_rank_stages[rank]:
                for mb in range(MICRO):
                    kinds = {k for s_, m, k in tasks if (s_, m) == (stage, mb)}
                    assert "F" in kinds and kinds & {"B", "I", "W"}, (schedule, stage, mb, kinds)
            # RunStats counts the global batch once (one replica), not once per pipeline rank
            assert r[i]["images"] == (STEPS - 1) * GLOBAL_BATCH
        # what one rank sends, the other receives
        assert per_rank[0][i]["bytes"]["sent"] == per_rank[1][i]["bytes"]["received"]

    # checkpoint resume (weights, momentum, step) equals uninterrupted training, in the pipeline and in a hybrid
    expected4 = reference_epochs(tiny_classifier(seed=0), *digits_tensors(EPOCH_SAMPLES), GLOBAL_BATCH, 2)
    resumed = {}
    for r in per_rank:
        assert r["resumed"][0] == 4 and r["hybrid_resumed"][0] == 4
        resumed.update(r["resumed"][1])
        assert_state_dicts_close(r["hybrid_resumed"][1], expected4, atol=1e-5)
    assert_state_dicts_close(resumed, expected4, atol=1e-5)
    # the checkpoint holds the full model: it loads into an unsplit module (= the reference after 1 epoch)
    full = ImageClassifier(tiny_classifier(seed=1).net)
    load_distributed(ckpt, full)  # a DCP directory keyed by the unsplit model's names, no process group
    first_epoch = reference_epochs(tiny_classifier(seed=0), *digits_tensors(EPOCH_SAMPLES), GLOBAL_BATCH, 1)
    assert_state_dicts_close(dict(full.net.state_dict()), first_epoch, atol=1e-5)

    # validate / test / predict on the trained pipeline equal one process with the same weights
    ref = tiny_classifier(seed=0)
    ref.net.load_state_dict(expected4)
    xe, ye = x[-GLOBAL_BATCH:][:10], y[-GLOBAL_BATCH:][:10]
    with torch.no_grad():
        logits = ref(xe)
    for r in per_rank:
        assert r["val"]["val/loss"] == pytest.approx(ref.loss_fn(logits, ye).item(), abs=1e-5)
        assert r["test"]["test/loss"] == pytest.approx(ref.loss_fn(logits, ye).item(), abs=1e-5)
        assert torch.equal(r["predict"], logits.argmax(dim=1))

    # a batch that does not split into microbatches=4 trains (issue 18: as 2 x 5; equivalence in test_pipeline_runtime.py)
    for r in per_rank:
        assert r["uneven"] == "no error", r["uneven"]
        assert not r["uneven_untouched"]


def test_stage_placement_and_theory():
    assert stage_ranks("1f1b", 2, 2) == [0, 1]
    assert stage_ranks("interleaved_1f1b", 4, 2) == [0, 1, 0, 1]
    assert stage_ranks("zbv_zero_bubble", 4, 2) == [0, 1, 1, 0]
    assert local_stage_indices("dualpipev", 6, 3, 1) == [1, 4]
    assert theoretical_bubble("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("1f1b", 2, 4) == pytest.approx(1 / 5)
    assert theoretical_bubble("interleaved_1f1b", 2, 4, 2) == pytest.approx(1 / 9)
    assert theoretical_bubble("interleaved_1f1b", 2, 1, 2) == pytest.approx(1 / 2)  # m < p: each round alone


@pytest.mark.parametrize("schedule,per_rank", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
@pytest.mark.parametrize("pp,micro", [(2, 4), (2, 8), (4, 8)])
def test_runtime_task_orders_with_equal_tasks_are_at_theory(schedule, per_rank, pp, micro):
    """The orders the runtime runs, replayed with equal stages (backward = 2 forwards) and free
    communication, have exactly the textbook bubble: an excess the benchmark measures is not the schedule's."""
    from lightning_distnn.parallel.pipeline.overlap import compute_orders
    from lightning_distnn.parallel.pipeline.timeline import replay, task_makes, task_needs

    orders = compute_orders(schedule, pp, micro, per_rank)
    if orders is None:
        pytest.skip("this torch has no action runtime")
    last = pp * per_rank - 1
    end, busy = replay(dict(orders), duration=lambda t: (2.0 if t[0] == "B" else 1.0) / per_rank,
                       needs=lambda t: task_needs(*t, last), made=lambda t: task_makes(*t))
    span = max(end.values())
    bubble = sum(1 - busy[r] / span for r in busy) / len(busy)
    assert bubble == pytest.approx(theoretical_bubble(schedule, pp, micro, per_rank), abs=1e-9)


def test_schedule_names_are_case_insensitive_and_listed():
    assert schedule_class("GPipe") is SCHEDULES["gpipe"]
    assert PipelineStrategy(schedule="Interleaved_1F1B").schedule == "interleaved_1f1b"
    with pytest.raises(ValueError) as err:
        PipelineStrategy(schedule="2f2b")
    for name in SCHEDULES:
        assert name in str(err.value)


def test_registered_name():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="distnn_pipeline", logger=False)
    assert isinstance(trainer.strategy, PipelineStrategy)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="1f1b", microbatches=1), "needs at least 2 micro-batches, got microbatches=1"),
        (dict(schedule="dualpipev", microbatches=2), "needs at least 4 micro-batches"),
        (dict(schedule="interleaved_1f1b", microbatches=5), "not a multiple of its 2 rounds"),
        (dict(schedule="gpipe", partition=[2, 3, 3]), "has 3 stages, but pp=2"),
        (dict(schedule="gpipe", stages_per_rank=2), "one stage per rank"),
        (dict(schedule="zbv_zero_bubble", stages_per_rank=3), "exactly 2 stages per rank"),
    ],
)
def test_bad_layouts_fail_before_launch(kwargs, match):
    # _configure_launcher runs in the launching process, before any child exists
    with pytest.raises(ValueError, match=match):
        pl.Trainer(accelerator="cpu", devices=2, strategy=PipelineStrategy(**kwargs), logger=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid: balanced, uniform"):
        PipelineStrategy(partition="random")
    with pytest.raises(ValueError, match="positive integer"):
        PipelineStrategy(microbatches=0)
    with pytest.raises(ValueError, match="do not split into microbatches=4 equal micro-batches"):
        check_microbatches(10, 4, schedule="gpipe", pp_size=2, num_stages=2)


class _NoSequence(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)

    def loss_fn(self, outputs, targets):
        return outputs.sum()


class _NoLoss(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def _connected(strategy):
    pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    return strategy


def test_module_contract_and_depth_checked_before_any_step():
    with pytest.raises(TypeError, match="exactly one nn.Sequential"):
        _connected(PipelineStrategy(partition="uniform")).connect(_NoSequence())
    with pytest.raises(TypeError, match="loss_fn"):
        _connected(PipelineStrategy(partition="uniform")).connect(_NoLoss())
    shallow = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="4 pipeline stages .* need at least 4 layers, .* has 3"):
        _connected(PipelineStrategy(schedule="looped_bfs", partition="uniform")).connect(shallow)
    with pytest.raises(ValueError, match="covers 7 layers, the network has 8"):
        _connected(PipelineStrategy(partition=[3, 4])).connect(tiny_classifier())


def test_configure_model_module_is_checked_after_the_hook():
    """Its layers do not exist before Lightning's configure_model hook: the check waits for it (on every rank)."""
    strategy = _connected(PipelineStrategy(partition="uniform"))
    module = _BuiltInConfigureModel(seed=0)
    strategy.connect(module)  # no layers yet: no error here
    with pytest.raises(TypeError, match="exactly one nn.Sequential"):
        with strategy.model_sharded_context():
            pass  # a hook that built nothing
    with strategy.model_sharded_context():
        module.configure_model()
    assert isinstance(module.net, nn.Sequential)
