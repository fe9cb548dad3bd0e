"""Bring your own model: a torchvision ResNet under pipeline, tensor and hybrid parallelism (issue 14).

The network is a plain torchvision ``ResNet`` (CIFAR stem, width 4, one block per stage, 16x16
digits). Equivalence is to one process within 1e-5: for tensor parallelism the ordinary step; under
a pipeline, BatchNorm normalises each micro-batch on its own, so the reference is one process that
runs the same micro-batches with gradient accumulation (docs/resnet.md).
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from lightning_distnn.checkpoint import load_distributed
from lightning_distnn.models import ImageClassifier, cifar_resnet, resnet18_cifar
from lightning_distnn.parallel.chain import chain_as_sequential
from lightning_distnn.strategies._common import sequential_of
from lightning_distnn.strategies._pipeline_steps import LocalLayers
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer, sampler_order

STEPS, BATCH, IMAGE, MICRO = 2, 8, 16, 2
NET = dict(layers=(1, 1, 1, 1), width=4)


def _module(seed: int = 0) -> ImageClassifier:
    return ImageClassifier(cifar_resnet(**NET, seed=seed))


def _full_state(module: nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


def _reference(microbatches: int, dp: int = 1):
    """One process, the Trainer's sample order, each batch as ``microbatches`` accumulated micro-batches.

    With ``dp`` replicas, replica ``r`` sees ``perm[r::dp]`` (Lightning's DistributedSampler) and keeps its own
    BatchNorm running statistics (only gradients are averaged): a list of states, one per replica.
    """
    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    order = sampler_order(len(x))
    ref = copy.deepcopy(_module())
    opt = ref.configure_optimizers()
    ref.train()
    buffers = [{k: b.clone() for k, b in ref.net.named_buffers()} for _ in range(dp)]
    per = BATCH // dp
    for step in range(STEPS):
        opt.zero_grad()
        for r in range(dp):
            ref.net.load_state_dict(buffers[r], strict=False)
            idx = order[r::dp][step * per : (step + 1) * per]
            for xc, yc in zip(x[idx].chunk(microbatches), y[idx].chunk(microbatches)):
                (ref.loss_fn(ref(xc), yc) / (microbatches * dp)).backward()
            buffers[r] = {k: b.clone() for k, b in ref.net.named_buffers()}
        opt.step()
    states = []
    for r in range(dp):
        ref.net.load_state_dict(buffers[r], strict=False)
        states.append({k: v.detach().clone() for k, v in ref.net.state_dict().items()})
    return states[0] if dp == 1 else states


# ---- the chain view, the skeleton, the errors (one process) ------------------------------------------------------
def test_resnet18_cifar_is_torchvision_resnet_with_cifar_stem():
    net = resnet18_cifar(width=8, seed=0)
    assert type(net) is ResNet and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert net(torch.randn(2, 3, IMAGE, IMAGE)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"layers=\[2, 2\] must be four"):
        cifar_resnet(layers=(2, 2))


def test_chain_view_shares_modules_and_keeps_names():
    net = cifar_resnet(layers=(2, 1, 1, 1), width=4, seed=0).eval()
    seq, names = chain_as_sequential(net)
    assert names == ("conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1", "layer2.0", "layer3.0", "layer4.0",
                     "avgpool", "(torch.flatten)", "fc")
    assert seq[4] is net.layer1[0] and seq[-1] is net.fc  # a view: training it trains the network
    assert net.relu.inplace and not seq[2].inplace  # a stage may start with it: out of place on a received leaf
    x = torch.randn(3, 3, IMAGE, IMAGE)
    torch.testing.assert_close(seq(x), net(x), atol=0, rtol=0)
    # an nn.Sequential is its own view
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert chain_as_sequential(plain).sequential is plain and chain_as_sequential(plain).names == ("0", "1")
    # the skeleton of a rank's layers keeps the unsplit network's state-dict keys
    local = LocalLayers([(names[i], seq[i]) for i in (6, 7, 11)])
    expected = {k for k in net.state_dict() if k.startswith(("layer2.0.", "layer3.0.", "fc."))}
    assert set(local.state_dict()) == expected
    with pytest.raises(RuntimeError, match="split over pipeline stages"):
        local(x)


def test_vgg_and_alexnet_are_chains_too():
    from torchvision.models import alexnet, vgg11

    with torch.device("meta"):  # names only: no 100M-parameter allocation
        for net, features, classifier in ((vgg11(), 21, 7), (alexnet(), 13, 7)):
            _, names = chain_as_sequential(net)
            assert len(names) == features + 2 + classifier
            assert names[features:features + 2] == ("avgpool", "(torch.flatten)") and names[-1] == "classifier.6"


def test_mobilenet_v2_is_a_chain_with_glue():
    from lightning_distnn.models import mobilenet_v2_cpu

    net = mobilenet_v2_cpu(blocks=2, seed=0).eval()
    seq, names = chain_as_sequential(net)
    assert names[:4] == ("features.0.0", "features.0.1", "features.0.2", "features.1")
    assert names[-4:] == ("(adaptive_avg_pool2d)", "(torch.flatten)", "classifier.0", "classifier.1")
    x = torch.randn(2, 3, IMAGE, IMAGE)
    torch.testing.assert_close(seq(x), net(x), atol=0, rtol=0)


def test_unsplittable_network_error_names_the_module():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x) + x)

    class Wrapper(ImageClassifier):
        pass

    with pytest.raises(TypeError, match=r"Wrapper must hold exactly one nn.Sequential.*net \(TwoHeads\).*nn.Sequential"):
        sequential_of(Wrapper(TwoHeads()))
    with pytest.raises(TypeError, match=r"Wrapper.net \(TwoHeads\) cannot be split.*data-parallel strategy"):
        sequential_of(Wrapper(TwoHeads()), "net")

    class MyResNet(ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match=r"MyResNet overrides the forward of ResNet.*Rewrite MyResNet"):
        chain_as_sequential(MyResNet(BasicBlock, [1, 1, 1, 1]))
    attr, net = sequential_of(_module())
    assert attr == "net" and isinstance(net, ResNet)


# ---- through the Trainer (spawned gloo processes) ---------------------------------------------------------------
def _fit_many(rank, world_size, names):
    return {name: _fit(rank, world_size, name, None) for name in names}


def _fit(rank, world_size, strategy_name, ckpt_dir):
    from lightning_distnn.strategies import HybridStrategy, PipelineStrategy, TensorParallelStrategy

    strategies = {
        "dp2xtp2": lambda: HybridStrategy(dp=2, pp=1, tp=2, timeout=120),
        "dp2xpp2": lambda: HybridStrategy(dp=2, pp=2, tp=1, microbatches=MICRO, partition=[6, 5], timeout=120),
        "pp2": lambda: PipelineStrategy(microbatches=MICRO, partition="balanced", timeout=120),
        "tp2": lambda: TensorParallelStrategy(timeout=120),
        "pp2xtp2": lambda: HybridStrategy(dp=1, pp=2, tp=2, microbatches=MICRO, partition=[6, 5], timeout=120),
    }
    module = _module()
    x, y = digits_tensors(STEPS * BATCH, image_size=IMAGE)
    strategy = strategies[strategy_name]()
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, BATCH // (2 if strategy_name.startswith("dp2") else 1)))
    if ckpt_dir is not None:
        trainer.save_checkpoint(ckpt_dir)
    out = dict(state=_full_state(module.net), describe=strategy.describe(), bytes=strategy.comm_bytes_per_step(),
               replica=strategy.distributed_sampler_kwargs["rank"])
    if strategy.tp_plans:
        out["styles"] = strategy.tp_plans[0].styles()
    if strategy.net.stage_plan is not None:
        out["counts"] = strategy.net.stage_plan.counts
    return out


def _check_union(results, expected, replica: int = 0):
    merged: dict = {}
    for r in (r for r in results if r["replica"] == replica):
        for k, v in r["state"].items():
            if k in merged:  # a tensor-parallel peer holds the same stage
                torch.testing.assert_close(v, merged[k], atol=0, rtol=0)
            merged[k] = v
    assert set(merged) == set(expected), set(merged) ^ set(expected)
    assert_state_dicts_close(merged, expected, atol=1e-5)  # weights and BatchNorm running statistics


@pytest.mark.slow
def test_pipeline_pp2_resnet_matches_micro_batch_accumulation(tmp_path):
    ckpt = tmp_path / "pp2.ckpt"
    results = run_distributed(_fit, 2, "pp2", str(ckpt), timeout=400)
    expected = _reference(MICRO)
    initial = _module().net.state_dict()
    assert max((expected[k].float() - initial[k].float()).abs().max().item() for k in expected) > 1e-3
    # each rank holds only its blocks, under the unsplit network's names (e.g. layer1.0.conv1.weight)
    assert all(set(r["state"]) < set(expected) for r in results)
    assert sum(results[0]["counts"]) == len(chain_as_sequential(_module().net).names)
    _check_union(results, expected)
    # the DCP checkpoint of the pp=2 run loads into one process's unsplit ResNet
    full = _module(seed=7)
    load_distributed(ckpt, full)
    assert_state_dicts_close(dict(full.net.state_dict()), expected, atol=1e-5)
    # the full-batch step differs (BatchNorm statistics per micro-batch): the comparison can fail
    whole = _reference(1)
    assert max((whole[k].float() - expected[k].float()).abs().max().item() for k in expected) > 1e-4


@pytest.mark.slow
def test_tensor_parallel_tp2_trainer_on_torchvision_resnet():
    results = run_distributed(_fit, 2, "tp2", None, timeout=400)
    expected = _reference(1)
    for r in results:
        assert r["styles"]["layer1.0.conv1"] == "colwise" and r["styles"]["layer4.0.conv2"] == "rowwise"
        assert r["bytes"]["sent"] > 0
        assert_state_dicts_close(r["state"], expected, atol=1e-5)


@pytest.mark.slow
def test_hybrid_resnet_layouts_match_micro_batch_accumulation():
    """pp2 x tp2, dp2 x tp2 and dp2 x pp2 in one spawn of 4 processes (dp: BatchNorm statistics per replica)."""
    runs = run_distributed(_fit_many, 4, ["pp2xtp2", "dp2xtp2", "dp2xpp2"], timeout=600)
    for name, micro in (("dp2xtp2", 1), ("dp2xpp2", MICRO)):
        results = [r[name] for r in runs]
        assert sorted(r["replica"] for r in results) == [0, 0, 1, 1]
        for replica, expected in enumerate(_reference(micro, dp=2)):
            _check_union(results, expected, replica)
    # the replicas' running statistics differ (each normalises its own samples): the per-replica comparison can fail
    a, b = _reference(1, dp=2)
    assert (a["bn1.running_mean"] - b["bn1.running_mean"]).abs().max() > 1e-4
    results = [r["pp2xtp2"] for r in runs]
    assert results[0]["counts"] == [6, 5]  # stem, layer1.0, layer2.0 | layer3.0, layer4.0, avgpool, flatten, fc
    # tensor parallel inside each stage (names are the stage's layer indices): one all-reduce per block
    assert results[0]["styles"]["4.conv1"] == "colwise" and results[0]["styles"]["5.conv2"] == "rowwise"
    assert results[2]["styles"]["6.conv1"] == "colwise" and results[2]["styles"]["7.conv2"] == "rowwise"
    _check_union(results, _reference(MICRO))
