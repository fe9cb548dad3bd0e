"""FeatureParallelStrategy against a reference written in plain torch (the slices cut by hand, not by
the package's FeaturePlan/SplitNet), and its paths: sync_top=False, slice_inputs=False, DataLoader
workers, tabular column splits, resume via ckpt_path."""

import copy
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lightning_distnn  # noqa: F401
from lightning_distnn.models import SplitClassifier
from lightning_distnn.strategies import FeatureParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, cpu_state_dict, digits_tensors, quiet_trainer, sampler_order

STEPS, BATCH, IMAGE, COLUMNS = 4, 16, 16, 12
# the slices, written out: rank 0 the top 8 rows / first 6 columns, rank 1 the rest
SLICES = {"strips_h": [(slice(None), slice(None), slice(0, 8)), (slice(None), slice(None), slice(8, 16))],
          "columns": [(slice(None), slice(0, 6)), (slice(None), slice(6, 12))]}


def _model(partition, seed=0):
    torch.manual_seed(seed)
    shape = (3, IMAGE, IMAGE) if partition != "columns" else (COLUMNS,)
    return SplitClassifier(feature_partition=partition, parts=2, sample_shape=shape, width=4, embed_dim=8, top_width=16,
                           optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))


def _tabular(n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, COLUMNS, generator=g), torch.randint(0, 10, (n,), generator=g)


def _plain_reference(partition, x, y, *, steps_per_epoch, epochs, model=None, slices=None):
    """Bottoms and top copied from the seed-0 model, trained in plain torch on hand-cut slices."""
    model = model or _model(partition)
    slices = slices or SLICES[partition]
    bottoms = [copy.deepcopy(b) for b in model.net.bottoms]
    top = copy.deepcopy(model.net.top)
    params = [p for b in bottoms for p in b.parameters()] + list(top.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        order = sampler_order(len(x), epoch=epoch)  # one replica: every rank reads every sample
        xe, ye = x[order], y[order]
        for step in range(steps_per_epoch):
            xb, yb = xe[step * BATCH: (step + 1) * BATCH], ye[step * BATCH: (step + 1) * BATCH]
            features = torch.cat([b(xb[s]).flatten(1) for b, s in zip(bottoms, slices)], dim=1)
            opt.zero_grad()
            F.cross_entropy(top(features), yb).backward()
            opt.step()
    state = {f"top.{k}": v.detach().clone() for k, v in top.state_dict().items()}
    for r, b in enumerate(bottoms):
        state.update({f"bottoms.{r}.{k}": v.detach().clone() for k, v in b.state_dict().items()})
    return state


class _Seen(pl.Callback):
    def __init__(self):
        self.shapes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.add(tuple(batch[0].shape[1:]))


class _WorkerData(FixedDataModule):
    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=2, persistent_workers=False)


RUNS = {  # name -> (partition, strategy kwargs, datamodule class)
    "plain": ("strips_h", {}, FixedDataModule),
    "sync_top_off": ("strips_h", {"sync_top": False}, FixedDataModule),
    "full_inputs": ("strips_h", {"slice_inputs": False}, FixedDataModule),
    "workers": ("strips_h", {}, _WorkerData),
    "columns": ("columns", {}, FixedDataModule),
}


def _data(partition, n):
    return _tabular(n) if partition == "columns" else digits_tensors(n, image_size=IMAGE)


def _paths(rank, world_size, ckpt):
    out = {}
    for name, (partition, kwargs, datamodule) in RUNS.items():
        model, seen = _model(partition), _Seen()
        trainer = quiet_trainer(FeatureParallelStrategy(timeout=60, **kwargs), devices=world_size, max_steps=STEPS,
                                callbacks=[seen])
        trainer.fit(model, datamodule=datamodule(*_data(partition, STEPS * BATCH), BATCH))
        out[name] = (cpu_state_dict(model.net), seen.shapes)
    # resume: one epoch of 2 steps saved, a model from another seed resumed to the end of the second
    data = FixedDataModule(*_data("strips_h", 2 * BATCH), BATCH)
    model = _model("strips_h")
    trainer = quiet_trainer(FeatureParallelStrategy(timeout=60), devices=world_size, max_epochs=1, max_steps=-1)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(ckpt)
    model = _model("strips_h", seed=5)
    trainer = quiet_trainer(FeatureParallelStrategy(timeout=60), devices=world_size, max_epochs=2, max_steps=-1)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    out["resumed"] = (trainer.global_step, cpu_state_dict(model.net))
    return out


def _mine(expected, rank):
    return {k: v for k, v in expected.items() if k.startswith(f"bottoms.{rank}.") or k.startswith("top.")}


def test_feature_parallel_paths_match_plain_torch(tmp_path):
    results = run_distributed(_paths, 2, str(tmp_path / "fp.ckpt"), timeout=500)
    expected = {p: _plain_reference(p, *_data(p, STEPS * BATCH), steps_per_epoch=STEPS, epochs=1)
                for p in ("strips_h", "columns")}
    initial = _model("strips_h").net.state_dict()
    assert all((expected["strips_h"][k] - initial[k]).abs().max() > 1e-4 for k in initial if k.endswith("weight"))
    resumed = _plain_reference("strips_h", *_data("strips_h", 2 * BATCH), steps_per_epoch=2, epochs=2)
    for rank, r in enumerate(results):
        for name, (partition, kwargs, _) in RUNS.items():
            state, shapes = r[name]
            try:
                assert_state_dicts_close(state, _mine(expected[partition], rank), atol=1e-5)
            except AssertionError as err:
                raise AssertionError(f"{name}, rank {rank}: {err}") from None
            assert not any(k.startswith("bottoms.") and not k.startswith(f"bottoms.{rank}.") for k in state)
            full = (3, IMAGE, IMAGE) if partition != "columns" else (COLUMNS,)
            mine = (3, 8, IMAGE) if partition != "columns" else (6,)
            assert shapes == {full if name == "full_inputs" else mine}, (name, shapes)
        assert r["resumed"][0] == 4
        assert_state_dicts_close(r["resumed"][1], _mine(resumed, rank), atol=1e-5)
