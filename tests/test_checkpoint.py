"""Distributed checkpoints across layouts: tp=2 -> one process, one process -> tp=2, Lightning resume."""

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor

import lightning_distnn  # noqa: F401
from torch.utils.data import DataLoader, DistributedSampler

from lightning_distnn.checkpoint import is_distributed_checkpoint, load_distributed, save_distributed
from lightning_distnn.consolidate import main as consolidate_main
from lightning_distnn.consolidate import to_lightning_checkpoint
from lightning_distnn.models import CaseStudyCNN, ImageClassifier
from lightning_distnn.strategies import TensorParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    digits_tensors,
    quiet_trainer,
    sampler_order,
    tiny_classifier,
)

# One extra step after resuming: Lightning 2.6 resumes a checkpoint saved at max_steps on an epoch
# boundary with the epoch's batch counter still at its end, so its second resumed batch comes from
# the next epoch's order; one step keeps this test about the checkpoint, not about that counter.
STEPS, EXTRA_STEPS, BATCH = 3, 1, 16
WIDTH = dict(conv_filters=8, fc_width=16, image_size=16)


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _momenta(module, optimizer) -> dict:
    names = {p: n for n, p in module.named_parameters()}
    return {names[p]: _full(s["momentum_buffer"]) for p, s in optimizer.state.items()}


def _reference(steps_per_epoch: list):
    """One process: the same model and optimizer through epochs of sampler_order batches."""
    module = tiny_classifier(seed=0, **WIDTH)
    optimizer = module.configure_optimizers()
    x, y = digits_tensors(STEPS * BATCH)
    for epoch, steps in enumerate(steps_per_epoch):
        order = sampler_order(len(x), epoch=epoch)
        xe, ye = x[order], y[order]
        for s in range(steps):
            sl = slice(s * BATCH, (s + 1) * BATCH)
            optimizer.zero_grad()
            module.loss_fn(module(xe[sl]), ye[sl]).backward()
            optimizer.step()
    return module, optimizer


def _ckpt_worker(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_distnn.parallel.tensor import apply_tp

    x, y = digits_tensors(STEPS * BATCH)
    # 1. train at tp=2 and save through Lightning (a DCP directory)
    module = tiny_classifier(seed=0, **WIDTH)
    trainer = quiet_trainer(TensorParallelStrategy(timeout=60), devices=world_size, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, BATCH))
    trainer.save_checkpoint(f"{root}/tp2")
    # 2. resume from it in a new Trainer at tp=2 for EXTRA_STEPS more (epoch 1)
    resumed = tiny_classifier(seed=5, **WIDTH)  # other initial weights: the checkpoint must overwrite them
    trainer = quiet_trainer(TensorParallelStrategy(timeout=60), devices=world_size, max_steps=STEPS + EXTRA_STEPS)
    trainer.fit(resumed, datamodule=FixedDataModule(x, y, BATCH), ckpt_path=f"{root}/tp2")
    resumed_step = trainer.global_step
    # 3. load the one-process checkpoint into a tp=2 model and optimizer (pure torch)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    target = tiny_classifier(seed=7, **WIDTH)
    apply_tp(target.net, mesh["tp"])
    optimizer = target.configure_optimizers()
    load_distributed(f"{root}/tp1", target, [optimizer])
    return {
        "resumed": {k: _full(v) for k, v in resumed.net.state_dict().items()},
        "resumed_step": resumed_step,
        "loaded": {k: _full(v) for k, v in target.state_dict().items() if k.startswith("net.")},
        "loaded_momenta": _momenta(target, optimizer),
    }


@pytest.mark.slow
def test_checkpoints_reload_across_tp_sizes(tmp_path):
    reference, ref_opt = _reference([STEPS])
    save_distributed(tmp_path / "tp1", reference, [ref_opt], extra={"note": "one process"})  # no process group
    results = run_distributed(_ckpt_worker, 2, str(tmp_path), timeout=300)

    ref_net = {k: v for k, v in reference.state_dict().items() if k.startswith("net.")}
    ref_momenta = _momenta(reference, ref_opt)
    continued, _ = _reference([STEPS, EXTRA_STEPS])
    for r in results:
        # one process (tp=1) -> tp=2, weights and optimizer state
        assert_state_dicts_close(r["loaded"], ref_net, atol=0)
        assert_state_dicts_close(r["loaded_momenta"], ref_momenta, atol=0)
        # tp=2 -> tp=2 resume through Lightning continues exactly like one process would
        assert r["resumed_step"] == STEPS + EXTRA_STEPS
        assert_state_dicts_close(r["resumed"], continued.net.state_dict(), atol=1e-5)

    # tp=2 -> one process without torch.distributed: weights, momenta and Lightning's state
    assert is_distributed_checkpoint(tmp_path / "tp2")
    single = tiny_classifier(seed=9, **WIDTH)
    optimizer = single.configure_optimizers()
    meta = load_distributed(tmp_path / "tp2", single, [optimizer])
    assert meta["global_step"] == STEPS
    assert_state_dicts_close(single.net.state_dict(), reference.net.state_dict(), atol=1e-5)
    assert_state_dicts_close(_momenta(single, optimizer), ref_momenta, atol=1e-5)

    # tp=2 -> one Lightning file: plain Lightning on one process resumes from it as the tp=2 run did
    file = to_lightning_checkpoint(tmp_path / "tp2", module=tiny_classifier(seed=9, **WIDTH))
    assert file == tmp_path / "tp2.consolidated.ckpt"
    x, y = digits_tensors(STEPS * BATCH)
    one = tiny_classifier(seed=5, **WIDTH)
    quiet_trainer("auto", devices=1, max_steps=STEPS + EXTRA_STEPS).fit(one, datamodule=_Sampled(x, y, BATCH), ckpt_path=file)
    assert_state_dicts_close(one.net.state_dict(), continued.net.state_dict(), atol=1e-5)
    # without the module: the weights, which LightningModule.load_from_checkpoint reads
    weights = to_lightning_checkpoint(tmp_path / "tp2", tmp_path / "weights.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(weights, net=CaseStudyCNN(**WIDTH))
    assert_state_dicts_close(loaded.net.state_dict(), reference.net.state_dict(), atol=1e-5)
    assert "optimizer_states" not in torch.load(weights, weights_only=False)


class _Sampled(FixedDataModule):
    """One process reading in the order Lightning's DistributedSampler gives a distributed run."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


def test_consolidate_cli(tmp_path, capsys):
    module = tiny_classifier(seed=0, **WIDTH)
    save_distributed(tmp_path / "run" / "step-3", module, [module.configure_optimizers()], extra={"global_step": 3},
                     layout="one process")
    (tmp_path / "run" / "empty").mkdir()
    assert consolidate_main(["list", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step-3  step 3  [one process]" in out and "empty  NOT RESUMABLE" in out and "manifest.json is missing" in out
    # no distnn-train config above it: the weights, and how to keep the optimizer state
    assert consolidate_main(["consolidate", str(tmp_path / "run" / "step-3"), "-o", str(tmp_path / "w.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "weights only" in out and "module=YourModule" in out
    assert torch.load(tmp_path / "w.ckpt", weights_only=False)["global_step"] == 3
    # --run: the model from a distnn-train run's config (elastic checkpoints sit outside the run directory)
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    (tmp_path / "job" / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: lightning_distnn.testing.equivalence.tiny_classifier\n  seed: 1\n  conv_filters: 8\n"
        "  fc_width: 16\n  image_size: 16\n")
    assert consolidate_main(["consolidate", str(tmp_path / "run" / "step-3"), "--run", str(tmp_path / "job")]) == 0
    assert "optimizer state included" in capsys.readouterr().out
    whole = torch.load(tmp_path / "run" / "step-3.consolidated.ckpt", weights_only=False)
    assert_state_dicts_close({k[len("net."):]: v for k, v in whole["state_dict"].items()}, module.net.state_dict(), atol=0)
    assert len(whole["optimizer_states"]) == 1
    # bad input: one line that says what to pass, exit 2
    for argv, says in [(["nothing"], "not a distributed checkpoint"), (["w.ckpt"], "already a single-file"),
                       (["run/step-3", "--run", "nowhere"], "--run nowhere is neither a distnn-train run directory")]:
        assert consolidate_main(["consolidate", str(tmp_path / argv[0]), *argv[1:]]) == 2
        assert says in capsys.readouterr().err


def test_errors_name_the_path_and_fix(tmp_path):
    module = tiny_classifier(seed=0, **WIDTH)
    with pytest.raises(FileNotFoundError, match="not a distributed checkpoint"):
        load_distributed(tmp_path / "nothing", module)
    (tmp_path / "file.ckpt").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_distributed(tmp_path / "file.ckpt", module)
    save_distributed(tmp_path / "weights", module)  # weights only
    optimizer = module.configure_optimizers()
    with pytest.raises(ValueError, match="0 optimizer"):
        load_distributed(tmp_path / "weights", module, [optimizer])
    other = copy.deepcopy(module)
    other.net.append(torch.nn.Linear(10, 10))
    with pytest.raises(KeyError, match="lacks 2 tensors"):
        load_distributed(tmp_path / "weights", other)
    load_distributed(tmp_path / "weights", other, strict=False)
    assert torch.equal(other.net[0][0].weight, module.net[0][0].weight)
