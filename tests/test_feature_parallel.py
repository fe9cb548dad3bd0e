"""FeatureParallelStrategy: equivalence with the single-process split network, digits accuracy, errors."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

import lightning_distnn  # noqa: F401
from lightning_distnn.models import SplitClassifier
from lightning_distnn.strategies import FeatureParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    cpu_state_dict,
    digits_tensors,
    quiet_trainer,
    reference_train,
)

STEPS, BATCH, IMAGE = 4, 16, 16


def _model(partition: str, parts: int) -> SplitClassifier:
    torch.manual_seed(0)
    return SplitClassifier(
        feature_partition=partition,
        parts=parts,
        sample_shape=(3, IMAGE, IMAGE),
        width=4,
        embed_dim=8,
        top_width=16,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )


class _SeenShapes(pl.Callback):
    def __init__(self):
        self.shapes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.add(tuple(batch[0].shape[1:]))


def _train_fp(rank, world_size, partition, digits_epochs, checkpoint=None):
    model = _model(partition, world_size)
    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    seen = _SeenShapes()
    trainer = quiet_trainer(FeatureParallelStrategy(timeout=60), devices=world_size, max_steps=STEPS, callbacks=[seen])
    trainer.fit(model, datamodule=FixedDataModule(x, y, BATCH))
    out = {"state": cpu_state_dict(model.net), "shapes": seen.shapes, "plan": model.plan}
    out["params"] = sum(p.numel() for p in model.parameters())
    if checkpoint:
        trainer.save_checkpoint(checkpoint)  # a DCP directory: every rank's bottom, the top once, optimizer states
        from lightning_distnn.checkpoint import load_distributed

        whole = _model(partition, world_size)  # an unsplit model: all bottoms
        load_distributed(checkpoint, whole)
        out["checkpoint"] = {k: v.detach().clone() for k, v in whole.net.state_dict().items()}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        momentum = [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()]
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        for state in trainer.optimizers[0].state.values():
            state["momentum_buffer"].zero_()
        trainer.strategy.load_checkpoint(checkpoint)  # each rank reads its own part back
        out["reloaded"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        after = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
        out["reloaded"] &= all(torch.equal(a, b) for a, b in zip(momentum, after)) and len(after) == len(momentum)
    if digits_epochs:
        from lightning_distnn.data import DigitsDataModule

        torch.manual_seed(1 + rank)  # each rank its own initialisation, as an unseeded script: the tops must agree
        digits_model = SplitClassifier(parts=world_size, sample_shape=(3, IMAGE, IMAGE), width=8, embed_dim=16, top_width=64)
        dm = DigitsDataModule(image_size=IMAGE, batch_size=32)
        trainer = quiet_trainer(FeatureParallelStrategy(timeout=60), devices=world_size, max_steps=-1, max_epochs=digits_epochs)
        trainer.fit(digits_model, datamodule=dm)
        out["test_acc"] = trainer.test(digits_model, datamodule=dm, verbose=False)[0]["test/acc"]
        out["top"] = cpu_state_dict(digits_model.net.top)
    return out


# each rank's slice, cut by hand (the reference must not share the package's FeaturePlan / SplitNet forward)
HAND_CUT = {
    ("strips_h", 2): [(slice(None), slice(None), slice(0, 8)), (slice(None), slice(None), slice(8, 16))],
    ("channels", 3): [(slice(None), slice(0, 1)), (slice(None), slice(1, 2)), (slice(None), slice(2, 3))],
}


def _check_equivalence(results, partition, world_size):
    from tests.test_feature_paths import _plain_reference

    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    reference = _model(partition, world_size)
    expected = _plain_reference(partition, x, y, steps_per_epoch=STEPS, epochs=1, model=reference,
                                slices=HAND_CUT[(partition, world_size)])
    # the package's own single-process forward agrees with the hand-cut one
    assert_state_dicts_close(reference_train(reference, x, y, BATCH, STEPS), expected, atol=1e-5)
    initial = reference.net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"
    for rank, result in enumerate(results):
        mine = {k: v for k, v in expected.items() if k.startswith(f"bottoms.{rank}.") or k.startswith("top.")}
        assert_state_dicts_close(result["state"], mine, atol=1e-5)
        # each rank holds one bottom and the top, and was fed only its own slice of the features
        assert not any(k.startswith("bottoms.") and not k.startswith(f"bottoms.{rank}.") for k in result["state"])
        assert result["shapes"] == {result["plan"][rank].shape_of((3, IMAGE, IMAGE))}
    return expected


@pytest.mark.slow
def test_feature_parallel_matches_single_process_and_learns_digits(tmp_path):
    results = run_distributed(_train_fp, 2, "strips_h", 3, str(tmp_path / "fp.ckpt"), timeout=420)
    expected = _check_equivalence(results, "strips_h", 2)
    # the checkpoint holds the whole split network (all bottoms), and each rank reloads its part
    assert_state_dicts_close(results[0]["checkpoint"], expected, atol=1e-5)
    assert set(results[0]["checkpoint"]) == set(expected)
    assert all(r["reloaded"] for r in results)
    accuracy = results[0]["test_acc"]
    print(f"feature parallel (2 ranks, strips_h) digits test accuracy: {accuracy:.4f}")
    assert accuracy >= 0.90
    assert_state_dicts_close(results[1]["top"], results[0]["top"], atol=1e-6)  # the top replicas agree


@pytest.mark.slow
def test_feature_parallel_three_channel_groups():
    results = run_distributed(_train_fp, 3, "channels", 0, timeout=300)
    _check_equivalence(results, "channels", 3)


def test_parts_must_match_processes_before_spawn():
    trainer = pl.Trainer(accelerator="cpu", devices=3, strategy=FeatureParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match=r"2 slices .* 3 processes"):
        trainer.fit(_model("strips_h", 2))  # raised in this process: no child was started


def test_needs_a_split_network():
    from lightning_distnn.testing.equivalence import tiny_classifier

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="distnn_feature", logger=False)
    assert isinstance(trainer.strategy, FeatureParallelStrategy)
    with pytest.raises(TypeError, match="SplitClassifier"):
        trainer.fit(tiny_classifier())
    with pytest.raises(TypeError, match="SplitNet"):
        SplitClassifier(net=torch.nn.Linear(2, 2))


def test_split_net_single_process_is_the_sum_of_its_parts():
    model = _model("strips_w", 2)
    x = torch.randn(5, 3, IMAGE, IMAGE)
    pieces = model.plan.split(x)
    features = torch.cat([b(p).flatten(1) for b, p in zip(model.net.bottoms, pieces)], dim=1)
    assert torch.allclose(model(x), model.net.top(features))
    with pytest.raises(ValueError, match="bottoms"):
        type(model.net)(list(model.net.bottoms)[:1], model.net.top, model.plan)
