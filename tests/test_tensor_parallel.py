"""TensorParallelStrategy and apply_tp: equivalence with one process, parameter shares, plans, errors."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_distnn  # noqa: F401
from lightning_distnn.models import SeedNet
from lightning_distnn.parallel.tensor import apply_tp, comm_bytes, plan_tp, sharded_parameter_numel
from lightning_distnn.strategies import TensorParallelStrategy
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import (
    FixedDataModule,
    digits_tensors,
    quiet_trainer,
    reference_train,
    tiny_classifier,
)

STEPS, GLOBAL_BATCH = 3, 16
WIDTH = dict(conv_filters=8, fc_width=16, image_size=16)


def _full_state(module: nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


def _mixed_net() -> nn.Sequential:
    """Exercises sharded batch norm, a gather before GroupNorm, and a gathered network output."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10)),
    )


MIXED_PLAN = {"2.3": "colwise"}  # user override: the last Linear column-wise, its output gathered


def _train_plain(net, x, y, steps, batch):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        sl = slice(s * batch, (s + 1) * batch)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[sl]), y[sl]).backward()
        opt.step()


def _tp_worker(rank, world_size):
    """One process group, several checks: Lightning equivalence, shares, bytes, a mixed network."""
    module = tiny_classifier(seed=0, **WIDTH)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    strategy = TensorParallelStrategy(timeout=60)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH))  # dp=1: every rank sees the global batch
    local, full = sharded_parameter_numel(module.net)
    out = {
        "state": _full_state(module.net),
        "local": local,
        "full": full,
        "total": sum(p.numel() for p in module.net.parameters()),
        "bytes": strategy.comm_bytes_per_step(),
        "dims": strategy.parallel_dims.degrees,
        "plan": str(strategy.tp_plan),
        "styles": strategy.tp_plan.styles(),
    }
    # pure torch on the same group: a network with batch norm, GroupNorm and a user plan
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    net = _mixed_net()
    mixed_plan = apply_tp(net, mesh["tp"], plan=MIXED_PLAN)
    xs, ys = digits_tensors(3 * 8, image_size=8)
    _train_plain(net, xs, ys, 3, 8)
    out["mixed"] = _full_state(net)
    out["mixed_plan"] = mixed_plan.styles()
    return out


@pytest.mark.slow
def test_tp2_matches_single_process_and_shards_weights():
    results = run_distributed(_tp_worker, 2, timeout=300)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    # dp=1: the sampler is DistributedSampler(num_replicas=1), whose epoch-0 order is sampler_order
    expected = reference_train(tiny_classifier(seed=0, **WIDTH), x, y, GLOBAL_BATCH, STEPS)
    initial = tiny_classifier(seed=0, **WIDTH).net.state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-3 for k in expected), "reference did not train"
    for r in results:
        assert r["dims"] == {"dp": 1, "pp": 1, "tp": 2}
        assert_state_dicts_close(r["state"], expected, atol=1e-5)
        # every Conv2d and Linear except none is sharded; each rank holds half of them
        assert abs(r["local"] / (r["full"] / 2) - 1) < 0.05, (r["local"], r["full"])
        assert r["full"] > 0.9 * r["total"]
        assert r["bytes"]["sent"] > 0 and r["bytes"]["sent"] == r["bytes"]["received"]
    assert results[0]["styles"]["0.0"] == "colwise" and results[0]["styles"]["1.0"] == "rowwise"
    assert results[0]["styles"]["5.1"] == "rowwise"  # after a Flatten of a channel-sharded activation
    # the mixed network: batch norm on the shard, gathers where needed, user plan honoured
    net = _mixed_net()
    xs, ys = digits_tensors(3 * 8, image_size=8)
    _train_plain(net, xs, ys, 3, 8)
    for r in results:
        assert r["mixed_plan"]["0.1"] == "sharded_norm" and r["mixed_plan"]["2.3"] == "colwise"
        assert_state_dicts_close(r["mixed"], net.state_dict(), atol=1e-5)


def test_auto_plan_case_study_and_seednet():
    net = tiny_classifier(**WIDTH).net
    plan = plan_tp(net, 2)
    styles = plan.styles()
    convs = [styles[f"{i}.0"] for i in range(5)]
    assert convs == ["colwise", "rowwise", "colwise", "rowwise", "colwise"]
    assert [styles["5.1"], styles["6.0"], styles["7.0"]] == ["rowwise", "colwise", "rowwise"]
    assert plan.entries[-1].output == "replicate"
    text = str(plan)
    assert "tensor-parallel plan, tp=2" in text and "channel shard = contiguous feature block" in text
    # SeedNet: 6 and 16 channels, 120/84/10 features; odd count -> the last layer stays replicated
    seed_styles = plan_tp(SeedNet(), 2).styles()
    assert seed_styles["0.0"] == "colwise" and seed_styles["1.0"] == "rowwise"
    assert seed_styles["2.1"] == "colwise" and seed_styles["3.0"] == "rowwise" and seed_styles["4.0"] == "replicate"
    # channels not divisible by tp: left replicated by the automatic plan
    assert plan_tp(SeedNet(), 4).styles()["0.0"] == "replicate"


def test_plan_gathers_before_modules_that_need_the_whole_activation():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(6, 6))  # Linear on a 4-D tensor, no Flatten
    plan = plan_tp(net, 2)
    assert plan.entries[0].style == "colwise" and plan.entries[0].output == "replicate"
    assert "output gathered" in plan.entries[0].note
    assert plan.styles()["2"] == "replicate"  # the last layer has no row-wise partner: left whole


def test_user_plan_errors_name_the_value_and_fix():
    net = tiny_classifier(**WIDTH).net
    with pytest.raises(ValueError, match=r"'9\.9'.*valid names"):
        plan_tp(net, 2, plan={"9.9": "colwise"})
    with pytest.raises(ValueError, match=r"'diagonal'.*colwise, rowwise"):
        plan_tp(net, 2, plan={"0.0": "diagonal"})
    with pytest.raises(ValueError, match=r"'0.1'.*ReLU"):
        plan_tp(net, 2, plan={"0.1": "colwise"})
    with pytest.raises(ValueError, match=r"out_channels=8 over tp=3"):
        plan_tp(net, 3, plan={"0.0": "colwise"})
    with pytest.raises(TypeError, match="nn.Sequential"):
        plan_tp(nn.Linear(2, 2), 2)
    dropout = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'3' \(Dropout, p=0.5\).*replicated"):
        plan_tp(dropout, 2)


def test_strategy_validates_before_launch():
    with pytest.raises(ValueError, match=r"tp=3 does not divide the 2 processes"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(tp=3), logger=False)
    with pytest.raises(ValueError, match=r"tp=0"):
        TensorParallelStrategy(tp=0)
    with pytest.raises(TypeError, match="plan must map"):
        TensorParallelStrategy(plan=["0.0"])


def test_registered_name():
    assert "distnn_tp" in pl.strategies.StrategyRegistry.available_strategies()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="distnn_tp", logger=False)
    assert isinstance(trainer.strategy, TensorParallelStrategy)


def test_comm_bytes_analytic_formula():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 4))
    plan = plan_tp(net, 2)  # col, row, col, row
    numel = {"0": (32, 32), "2": (32, 32), "4": (32, 16), "5": (16, 16)}
    # first colwise: no input gradient; row: 2*(1/2)*32*4; col: 2*(1/2)*32*4 (input grad); row: 2*(1/2)*16*4
    assert comm_bytes(plan, numel) == {"sent": 128 + 128 + 64, "received": 128 + 128 + 64}
    assert comm_bytes(plan_tp(net, 1), numel) == {"sent": 0, "received": 0}


def _dp_tp_worker(rank, world_size):
    module = tiny_classifier(seed=0, **WIDTH)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    strategy = TensorParallelStrategy(tp=2, timeout=60)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, GLOBAL_BATCH // (world_size // 2)))
    return {"state": _full_state(module.net), "dims": strategy.parallel_dims.degrees}


@pytest.mark.slow
def test_dp2_x_tp2_matches_single_process():
    results = run_distributed(_dp_tp_worker, 4, timeout=400)
    x, y = digits_tensors(STEPS * GLOBAL_BATCH)
    expected = reference_train(tiny_classifier(seed=0, **WIDTH), x, y, GLOBAL_BATCH, STEPS)
    for r in results:
        assert r["dims"] == {"dp": 2, "pp": 1, "tp": 2}
        assert_state_dicts_close(r["state"], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the rule table makes the same plans as the state machine it replaced (golden tables)
# --------------------------------------------------------------------------------------------
GOLDEN = __import__("pathlib").Path(__file__).with_name("tp_plans_golden.json")
_VOCAB = ["conv", "conv_odd", "conv_g", "lin", "lin_odd", "relu", "identity", "maxpool", "avgpool", "adapt",
          "flatten", "flatten2", "bn", "bn_odd", "bn1d", "ln", "gn", "drop0", "drop", "custom", "seq"]
_STYLE_CHOICES = ("colwise", "rowwise", "replicate", "sharded_norm", "pass")


class Custom(nn.Module):  # the golden tables name its kind "Custom"
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


def _vocab_module(token: str, c: int = 8) -> nn.Module:
    return {
        "conv": lambda: nn.Conv2d(c, 8, 3, padding=1), "conv_odd": lambda: nn.Conv2d(c, 6, 3, padding=1),
        "conv_g": lambda: nn.Conv2d(c, 8, 3, padding=1, groups=2), "lin": lambda: nn.Linear(c, 8),
        "lin_odd": lambda: nn.Linear(c, 6), "relu": nn.ReLU, "identity": nn.Identity,
        "maxpool": lambda: nn.MaxPool2d(2), "avgpool": lambda: nn.AvgPool2d(2), "adapt": lambda: nn.AdaptiveAvgPool2d(1),
        "flatten": nn.Flatten, "flatten2": lambda: nn.Flatten(2), "bn": lambda: nn.BatchNorm2d(8),
        "bn_odd": lambda: nn.BatchNorm2d(6), "bn1d": lambda: nn.BatchNorm1d(8), "ln": lambda: nn.LayerNorm(8),
        "gn": lambda: nn.GroupNorm(2, 8), "drop0": lambda: nn.Dropout(0.0), "drop": lambda: nn.Dropout(0.5),
        "custom": Custom, "seq": lambda: nn.Sequential(nn.Conv2d(c, 8, 1), nn.ReLU()),
    }[token]()


def _random_net(rng) -> nn.Sequential:
    n = rng.randint(1, 9)
    mods = [_vocab_module(rng.choice(_VOCAB)) for _ in range(n)]
    if rng.random() < 0.5 and n > 2:  # nest a slice
        i = rng.randint(0, n - 2)
        j = rng.randint(i + 1, n)
        mods = mods[:i] + [nn.Sequential(*mods[i:j])] + mods[j:]
    return nn.Sequential(*mods)


def _golden_cases():
    """(label, network factory, tp, user plan): the networks the tests plan, slices, overrides, random nets."""
    import random

    from lightning_distnn.models import CaseStudyCNN

    out = []
    for tp in (1, 2, 3, 4, 5):
        out.append((f"tiny tp{tp}", lambda: tiny_classifier(**WIDTH).net, tp, None))
        out.append((f"seednet tp{tp}", SeedNet, tp, None))
        out.append((f"casestudy tp{tp}", lambda: CaseStudyCNN(conv_filters=20, fc_width=40, image_size=16), tp, None))
    tiny = tiny_classifier(**WIDTH).net
    for i in range(len(tiny)):
        for j in range(i + 1, len(tiny) + 1):
            out.append((f"tiny[{i}:{j}] tp2", lambda i=i, j=j: nn.Sequential(*list(tiny_classifier(**WIDTH).net)[i:j]),
                        2, None))
    for name in [n for n, m in tiny.named_modules() if n and not isinstance(m, nn.Sequential)]:
        for style in _STYLE_CHOICES:
            out.append((f"tiny {name}={style} tp2", lambda: tiny_classifier(**WIDTH).net, 2, {name: style}))
    rng = random.Random(14)
    for k in range(150):
        seed, tp = rng.randrange(10**6), rng.choice((2, 2, 2, 4))
        r = random.Random(seed)
        net = _random_net(r)
        names = [n for n, m in net.named_modules() if n and not isinstance(m, nn.Sequential)]
        plan = None
        if names and r.random() < 0.5:
            plan = {r.choice(names): r.choice(_STYLE_CHOICES) for _ in range(r.randint(1, 2))}
        out.append((f"random{k} seed{seed} tp{tp}", lambda seed=seed: _random_net(random.Random(seed)), tp, plan))
    return out


def test_rule_table_reproduces_the_golden_plans():
    """Styles and layouts of every row (and every error message) equal the tables of the state machine."""
    import json

    golden = json.loads(GOLDEN.read_text())
    cases = _golden_cases()
    assert len(cases) == len(golden) == 301
    for label, factory, tp, plan in cases:
        want = golden[label]
        assert want["plan"] == plan, label
        try:
            got = {"rows": [" ".join((e.name, e.kind, e.style, e.input, e.output)) for e in plan_tp(factory(), tp, plan=plan).entries]}
        except (TypeError, ValueError) as exc:
            got = {"error": f"{type(exc).__name__}: {exc}"}
        assert got == {k: v for k, v in want.items() if k != "plan"}, label


def test_rules_table_prints_one_row_per_kind():
    from lightning_distnn.parallel.tensor import RULES, rules_table

    text = rules_table()
    assert len(text.splitlines()) == len(RULES) + 1
    assert "residual block" in text and "sharded_norm" in text and RULES[-1].matches(nn.Module())
