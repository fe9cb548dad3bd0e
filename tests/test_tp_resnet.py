"""Tensor parallelism on torchvision ResNets: one all-reduce per residual block, exact BatchNorm, tp=2 equivalence."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18

from lightning_distnn import models

from lightning_distnn.parallel.tensor import (
    activation_numel,
    apply_tp,
    comm_bytes,
    leaves,
    plan_tp,
    sharded_parameter_numel,
)
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import digits_tensors

STEPS, BATCH, IMAGE = 3, 8, 16


def cifar_resnet(block=BasicBlock, layers=(2, 2, 2, 2), *, width: int = 64, num_classes: int = 10, seed: int = 0):
    """The package's CIFAR ResNet (lightning_distnn.models.cifar_resnet), seeded so every process builds the same."""
    return models.cifar_resnet(block, layers, width=width, num_classes=num_classes, seed=seed)


def _blocks(net: ResNet) -> list[str]:
    return [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(net, f"layer{i}")))]


def test_basic_block_plan_one_all_reduce_per_block():
    net = cifar_resnet(width=16)
    plan = plan_tp(net, 2)
    styles = plan.styles()
    blocks = _blocks(net)
    assert len(blocks) == 8
    for b in blocks:
        assert styles[f"{b}.conv1"] == "colwise" and styles[f"{b}.bn1"] == "sharded_norm"
        assert styles[f"{b}.conv2"] == "rowwise" and styles[f"{b}.bn2"] == "replicate"
        assert styles[b] == "pass"
    # one row-wise conv (the forward all-reduce) per block, no gathers anywhere
    assert sum(e.style == "rowwise" for e in plan.entries) == len(blocks)
    assert not any("gathered" in e.note for e in plan.entries)
    # stride-2 convolutions are sharded too (the local convolution runs on the shard)
    assert net.layer2[0].conv1.stride == (2, 2) and styles["layer2.0.conv1"] == "colwise"
    # the shortcut, the stem and the classifier stay whole, with the reason
    by_name = {e.name: e for e in plan.entries}
    for name in ("layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"):
        assert by_name[name].style == "replicate" and "shortcut replicated" in by_name[name].note
    assert by_name["conv1"].style == "replicate" and "before 'layer1.0'" in by_name["conv1"].note
    assert by_name["fc"].style == "replicate" and "network output" in by_name["fc"].note
    assert by_name["(torch.flatten)"].kind == "Flatten"  # the functional glue of ResNet.forward
    # forward order of the chain of children, and leaves() names exactly the plan's rows
    assert [e.name for e in plan.entries][:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1"]
    assert [name for name, _ in leaves(net)] == [e.name for e in plan.entries]
    text = str(plan)
    assert "residual add and ReLU on whole tensors" in text and "per-channel statistics on the shard" in text


def test_bottleneck_and_imagenet_resnet18_plans():
    plan = plan_tp(cifar_resnet(Bottleneck, (1, 1, 1, 1), width=8), 2)
    styles = plan.styles()
    for b in ("layer1.0", "layer4.0"):
        assert [styles[f"{b}.conv{i}"] for i in (1, 2, 3)] == ["colwise", "rowwise", "replicate"]
        assert styles[f"{b}.bn1"] == "sharded_norm"
    assert sum(e.style == "rowwise" for e in plan.entries) == 4
    # torchvision's own resnet18 (7x7 stride-2 stem, maxpool): the same block structure
    imagenet = plan_tp(resnet18(num_classes=10), 4).styles()
    assert imagenet["conv1"] == "replicate" and imagenet["maxpool"] == "pass"
    assert imagenet["layer3.1.conv1"] == "colwise" and imagenet["layer3.1.conv2"] == "rowwise"


def test_bytes_per_step_two_all_reduces_per_block():
    net = cifar_resnet(width=8)
    numel = activation_numel(net, torch.randn(4, 3, IMAGE, IMAGE))
    assert numel["layer2.0.conv1"] == (4 * 8 * IMAGE * IMAGE, 4 * 16 * (IMAGE // 2) ** 2)  # stride 2
    # per block: conv2's output all-reduced forward, conv1's input gradient all-reduced backward;
    # an all-reduce of n bytes over tp ranks sends 2 (tp-1)/tp n
    tp = 4
    expected = sum(2 * (tp - 1) / tp * 4 * (numel[f"{b}.conv2"][1] + numel[f"{b}.conv1"][0]) for b in _blocks(net))
    assert comm_bytes(plan_tp(net, tp), numel) == {"sent": round(expected), "received": round(expected)}


def test_user_plans_and_refusals_name_the_module():
    net = cifar_resnet(width=8, layers=(1, 1, 1, 1))
    whole = plan_tp(net, 2, plan={"layer1.0": "replicate"})
    assert whole.styles()["layer1.0"] == "replicate" and "layer1.0.conv1" not in whole.styles()
    assert "user plan" in {e.name: e for e in whole.entries}["layer1.0"].note
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1'.*keeps whole.*drop one"):
        plan_tp(net, 2, plan={"layer1.0": "replicate", "layer1.0.conv1": "colwise"})
    with pytest.raises(ValueError, match=r"plan\['layer2\.0\.downsample'\]='colwise'.*shortcut.*remove it"):
        plan_tp(net, 2, plan={"layer2.0.downsample": "colwise"})
    with pytest.raises(ValueError, match=r"plan\['layer1\.0'\]='colwise' does not apply to BasicBlock"):
        plan_tp(net, 2, plan={"layer1.0": "colwise"})
    # a user override inside a block: the branch is still whole at the add (conv2 gathers in and out)
    gathered = plan_tp(net, 2, plan={"layer1.0.conv2": "colwise"})
    conv2 = {e.name: e for e in gathered.entries}["layer1.0.conv2"]
    assert (conv2.input, conv2.output) == ("shard(1)", "replicate")
    assert "input gathered" in conv2.note and "output gathered for the residual add of 'layer1.0'" in conv2.note

    class MyResNet(ResNet):
        def forward(self, x):  # its own forward: the order of its children is unknown
            return super().forward(x)

    mine = MyResNet(BasicBlock, [1, 1, 1, 1])
    with pytest.raises(TypeError, match=r"got MyResNet \(MyResNet overrides the forward of ResNet"):
        plan_tp(mine, 2)

    class MyBlock(BasicBlock):
        def forward(self, x):
            return super().forward(x)

    custom = nn.Sequential(nn.Conv2d(3, 8, 3), MyBlock(8, 8))
    entry = plan_tp(custom, 2).entries[-1]
    assert entry.name == "1" and entry.style == "replicate" and "unknown module" in entry.note


def _full_state(module: nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


NETS = {
    "basic": dict(block=BasicBlock, layers=(2, 2, 2, 2), width=8),
    "bottleneck": dict(block=Bottleneck, layers=(1, 1, 1, 1), width=4),
    "mobilenet_v2": dict(blocks=3),  # torchvision's MobileNetV2, width 0.25, its first 3 rows (6 blocks)
}
#: Share of the parameters in sharded layers: all but the stem, shortcuts and fc for BasicBlock; a
#: Bottleneck also keeps conv3 whole (one all-reduce per block shards two of its three convolutions);
#: MobileNetV2 keeps its stem and first block (no expand conv) and each block's project BatchNorm whole.
SHARDED_SHARE = {"basic": 0.95, "bottleneck": 0.4, "mobilenet_v2": 0.9}


def _net(name: str) -> nn.Module:
    if name == "mobilenet_v2":
        return models.mobilenet_v2_cpu(**NETS[name], seed=0)
    return cifar_resnet(**NETS[name])


def test_mobilenet_v2_plan_one_all_reduce_per_inverted_residual():
    """Expand conv colwise, depthwise conv on its channel shard (no traffic), project conv rowwise."""
    net = _net("mobilenet_v2")
    plan = plan_tp(net, 2)
    styles = plan.styles()
    for block in ("features.2", "features.3", "features.6"):
        assert styles[f"{block}.conv.0.0"] == "colwise" and styles[f"{block}.conv.1.0"] == "depthwise"
        assert styles[f"{block}.conv.1.1"] == "sharded_norm" and styles[f"{block}.conv.2"] == "rowwise"
    # the first block has no expand conv: its depthwise conv sees a replicated input and stays whole
    assert styles["features.1.conv.0.0"] == "replicate" and styles["features.0.0"] == "replicate"
    assert styles["features.7.0"] == "colwise" and styles["classifier.1"] == "rowwise"  # head: one all-reduce
    rowwise = [e for e in plan.entries if e.style == "rowwise"]
    assert len(rowwise) == 5 + 1  # one all-reduce per sharded block (features.2-6), one in the head
    with pytest.raises(ValueError, match=r"plan\['features.2.conv.0.0'\]='depthwise' does not apply to Conv2d"):
        plan_tp(net, 2, plan={"features.2.conv.0.0": "depthwise"})


def _train(net: nn.Module, steps: int) -> torch.Tensor:
    """``steps`` SGD steps in train mode (BatchNorm on batch statistics); returns eval-mode logits."""
    x, y = digits_tensors((steps + 1) * BATCH, image_size=IMAGE)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for s in range(steps):
        sl = slice(s * BATCH, (s + 1) * BATCH)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[sl]), y[sl]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return net(x[steps * BATCH:]).detach().clone()


def _resnet_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {}
    for name in NETS:
        net = _net(name)
        apply_tp(net, mesh["tp"])
        local, full = sharded_parameter_numel(net)
        replicated = sum(p.numel() for p in net.parameters()) - full
        logits = _train(net, STEPS)
        out[name] = dict(state=_full_state(net), logits=logits, local=local, full=full, replicated=replicated)
    return out


@pytest.mark.slow
def test_tp2_resnet_matches_single_process():
    results = run_distributed(_resnet_worker, 2, timeout=400, init_process_group=True)
    for name in NETS:
        initial = _net(name)
        reference = copy.deepcopy(initial)
        logits = _train(reference, STEPS)
        expected = reference.state_dict()
        moved = max((expected[k].float() - initial.state_dict()[k].float()).abs().max().item() for k in expected)
        assert moved > 1e-3, "reference did not train"
        total = sum(p.numel() for p in initial.parameters())
        for rank, r in enumerate(results):
            try:
                assert_state_dicts_close(r[name]["state"], expected, atol=1e-5)  # weights and BN running stats
                torch.testing.assert_close(r[name]["logits"], logits, atol=1e-5, rtol=0)  # eval mode: running stats
            except AssertionError as err:
                raise AssertionError(f"{name}, rank {rank}: {err}") from None
            # each rank holds half of every sharded parameter; the sharded ones are most of the network
            assert abs(r[name]["local"] / (r[name]["full"] / 2) - 1) < 0.05, (r[name]["local"], r[name]["full"])
            assert r[name]["full"] + r[name]["replicated"] == total
            assert r[name]["full"] > SHARDED_SHARE[name] * total, (name, r[name]["full"], total)


def _sequential_resnet(seed: int = 0):
    """The CIFAR ResNet's children as an nn.Sequential (the strategies' contract today) in an ImageClassifier."""
    from lightning_distnn.models import ImageClassifier

    net = cifar_resnet(width=8, layers=(1, 1, 1, 1), seed=seed)
    return ImageClassifier(nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4,
                                         net.avgpool, nn.Flatten(), net.fc))


def _strategy_worker(rank, world_size):
    from lightning_distnn.strategies import TensorParallelStrategy
    from lightning_distnn.testing.equivalence import FixedDataModule, quiet_trainer

    module = _sequential_resnet()
    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    strategy = TensorParallelStrategy(timeout=60)
    quiet_trainer(strategy, devices=world_size, max_steps=STEPS).fit(module, datamodule=FixedDataModule(x, y, BATCH))
    return dict(state=_full_state(module.net), styles=strategy.tp_plan.styles(), bytes=strategy.comm_bytes_per_step())


@pytest.mark.slow
def test_tensor_parallel_strategy_trains_residual_blocks():
    """distnn_tp through Lightning on a network holding torchvision BasicBlocks: equal to one process."""
    from lightning_distnn.testing.equivalence import reference_train

    results = run_distributed(_strategy_worker, 2, timeout=400)
    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    expected = reference_train(_sequential_resnet(), x, y, BATCH, STEPS)
    for r in results:
        assert r["styles"]["3.0.conv1"] == "colwise" and r["styles"]["4.0.conv2"] == "rowwise"
        assert r["bytes"]["sent"] > 0
        assert_state_dicts_close(r["state"], expected, atol=1e-5)
