"""distnn_auto: the planner chooses the layout at setup and the run equals that layout chosen by hand
(and one process with the same global batch)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_distnn  # noqa: F401
from lightning_distnn.strategies import AutoStrategy, HybridStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.models import ImageClassifier
from lightning_distnn.testing.equivalence import digits_tensors, quiet_trainer, reference_train, tiny_classifier

STEPS, GLOBAL = 3, 16


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="max_memory_per_rank=-1"):
        AutoStrategy(max_memory_per_rank=-1)
    with pytest.raises(ValueError, match="max_microbatches=0"):
        AutoStrategy(max_microbatches=0)
    with pytest.raises(ValueError, match="Unknown pipeline schedule"):
        AutoStrategy(schedules=["2f2b"])


def _full_state(strategy, module):
    from torch.distributed.tensor import DTensor

    local = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in module.net.state_dict().items()}
    parts = [None] * strategy.world_size
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _auto_then_by_hand(rank, world_size, cache_dir):
    x, y = digits_tensors(STEPS * GLOBAL)
    auto = AutoStrategy(timeout=60, cache_dir=cache_dir)
    module = tiny_classifier(seed=0)
    quiet_trainer(auto, devices=world_size, max_steps=STEPS).fit(
        module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=GLOBAL)
    )
    chosen = auto.plan.strategy()
    kwargs = {"dp": auto.dims.dp, "pp": auto.dims.pp, "tp": auto.dims.tp}
    if auto.dims.pp > 1:
        kwargs.update(schedule=auto.schedule, microbatches=auto.microbatches, partition=list(auto.partition),
                      stages_per_rank=auto.stages_per_rank if auto.stages_per_rank > 1 else None)
    by_hand = HybridStrategy(timeout=60, **kwargs)
    module2 = tiny_classifier(seed=0)
    quiet_trainer(by_hand, devices=world_size, max_steps=STEPS).fit(
        module2, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=GLOBAL // kwargs["dp"])
    )
    return {"auto": _full_state(auto, module), "hand": _full_state(by_hand, module2), "chosen": str(chosen),
            "describe": auto.describe(), "ranked": len(auto.plan.ranked)}


@pytest.mark.slow
def test_auto_equals_its_layout_by_hand_and_one_process(tmp_path):
    results = run_distributed(_auto_then_by_hand, 2, str(tmp_path), timeout=500)
    x, y = digits_tensors(STEPS * GLOBAL)
    expected = reference_train(tiny_classifier(seed=0), x, y, GLOBAL, STEPS)
    assert results[0]["chosen"] == results[1]["chosen"]  # every rank planned the same layout
    assert results[0]["ranked"] >= 2  # it compared layouts (dp2 and pp2 at least)
    for r in results:
        assert r["describe"].startswith("AutoStrategy(planned: ")
        assert_state_dicts_close(r["auto"], r["hand"], atol=1e-5)
        assert_state_dicts_close(r["auto"], expected, atol=1e-5)


class _Residual(nn.Module):
    """Not a chain: the head reads the stem's output plus the block's (nothing to cut or shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32))
        self.block = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + torch.relu(self.block(h)))


def _residual_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(_Residual())


def _auto_on_residual(rank, world_size, cache_dir):
    x, y = digits_tensors(STEPS * GLOBAL)
    auto = AutoStrategy(timeout=60, cache_dir=cache_dir)
    module = _residual_classifier()
    quiet_trainer(auto, devices=world_size, max_steps=STEPS).fit(
        module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=GLOBAL)
    )
    state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    memory = {t.symbol: t.value for t in auto.plan.best.memory_terms}
    return {"state": state, "layouts": sorted(e.layout.label for e in auto.plan.ranked), "why": auto.data_parallel_only,
            "states": auto.optimizer_states, "M_3 / M_1": memory["M_3"] / memory["M_1"],
            "rendered": auto.plan.render(top=3), "describe": auto.describe()}


@pytest.mark.slow
def test_auto_on_a_network_that_is_not_a_chain_plans_data_parallel(tmp_path):
    results = run_distributed(_auto_on_residual, 2, str(tmp_path), timeout=300)
    x, y = digits_tensors(STEPS * GLOBAL)
    expected = reference_train(_residual_classifier(), x, y, GLOBAL, STEPS)
    for r in results:
        assert r["layouts"] == ["dp2"]  # no pipeline or tensor-parallel layout of a network it cannot cut
        assert "_Residual is not a chain of layers" in r["why"] and r["why"] in r["rendered"]
        assert r["describe"] == "AutoStrategy(planned: dp2)"
        assert r["states"] == 1 and r["M_3 / M_1"] == pytest.approx(1.0)  # SGD with momentum, counted on the module
        assert_state_dicts_close(r["state"], expected, atol=1e-5)


def test_auto_counts_the_optimizers_states_per_parameter(caplog):
    from functools import partial

    adam = ImageClassifier(_Residual(), optimizer=partial(torch.optim.Adam, lr=1e-3))
    assert AutoStrategy._count_optimizer_states(adam) == 2

    class WithScheduler(ImageClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)  # no momentum: no state
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    assert AutoStrategy._count_optimizer_states(WithScheduler(_Residual())) == 0

    class Broken(ImageClassifier):
        def configure_optimizers(self):
            raise RuntimeError("needs the trainer")

    assert AutoStrategy._count_optimizer_states(Broken(_Residual())) == 1
    assert "pass AutoStrategy(optimizer_states=N)" in caplog.text
    with pytest.raises(ValueError, match="optimizer_states=-1"):
        AutoStrategy(optimizer_states=-1)
