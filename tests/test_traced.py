"""Any network through torch.distributed.pipelining's tracer with user split points (issue 14).

``SkipNet`` is not a chain of its children: the stem's output skips over the two encoder blocks (across
the cut), a dict carries values inside the forward, the blocks hold BatchNorm. Cut before
``encoder.b2`` it is a 2-stage pipeline whose boundary carries two tensors (packed into one).
"""

import copy

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import pipe_split

from lightning_distnn.checkpoint import load_distributed
from lightning_distnn.models import ImageClassifier
from lightning_distnn.parallel.traced import calls_pipe_split, cut_traced, traced_view
from lightning_distnn.testing import assert_state_dicts_close, run_distributed
from lightning_distnn.testing.equivalence import FixedDataModule, digits_tensors, quiet_trainer, sampler_order

STEPS, BATCH, IMAGE, MICRO = 2, 8, 8, 2
CUT = ["encoder.b2"]


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SkipNet(nn.Module):
    def __init__(self, width: int = 4, seed: int = 0, split: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.split = split
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.encoder = nn.ModuleDict({"b1": Block(width), "b2": Block(width)})
        self.head = nn.Linear(width * IMAGE * IMAGE, 10)

    def forward(self, x):
        h = self.stem(x)
        parts = {"skip": h, "h": self.encoder["b1"](h)}
        if self.split:
            pipe_split()
        h = self.encoder["b2"](parts["h"]) + parts["skip"]
        return self.head(torch.flatten(h, 1))


def _module(seed: int = 0) -> ImageClassifier:
    return ImageClassifier(SkipNet(seed=seed))


def _data():
    x, y = digits_tensors(STEPS * BATCH, image_size=16)
    return nn.functional.avg_pool2d(x, 2), y  # 8x8 keeps the head small


# ---- one process: the cut, its packing, the refusals ---------------------------------------------------------------
def test_traced_stages_equal_the_network_in_train_and_eval():
    net = SkipNet()
    ref = copy.deepcopy(net)
    x = torch.randn(8, 3, IMAGE, IMAGE)
    view, holders = traced_view(net, x, CUT, micro_size=4)
    s0, s1 = view.sequential
    assert [n for n, _ in holders[0]] == ["stem", "encoder.b1"] and [n for n, _ in holders[1]] == ["encoder.b2", "head"]
    assert holders[0][0][1] is net.stem  # the network's own modules: state-dict keys as unsplit
    packed = s0(x[:4])
    assert packed.shape == (4, 2 * 4 * IMAGE * IMAGE)  # block output and skip in one tensor
    out = s1(packed)
    expected = ref(x[:4])
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected.detach(), atol=1e-6, rtol=0)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(net.encoder.b1.bn.running_mean, ref.encoder.b1.bn.running_mean)  # updated in place
    # eval mode (BatchNorm's running statistics) and another micro-batch size: traced again, followed from the modules
    net.eval(), ref.eval()
    torch.testing.assert_close(s1(s0(x[:3])), ref(x[:3]), atol=1e-6, rtol=0)
    assert set(s0.graphs) == {"train_4", "eval_3"}


def test_pipe_split_in_forward_and_the_errors():
    x = torch.randn(4, 3, IMAGE, IMAGE)
    assert calls_pipe_split(SkipNet(split=True)) and not calls_pipe_split(nn.Sequential(nn.Linear(2, 2)))
    view, _, plan = cut_traced(SkipNet(split=True), x, microbatches=2, num_stages=2)
    assert len(view.sequential) == 2 and plan.counts == [1, 1]
    with pytest.raises(ValueError, match=r"makes 2 stages, the layout has 4"):
        cut_traced(SkipNet(split=True), x, microbatches=2, num_stages=4)
    with pytest.raises(ValueError, match=r"SkipNet has no cut points.*partition=\[.*pipe_split\(\)"):
        traced_view(SkipNet(), x)
    with pytest.raises(ValueError, match=r"\['encoder.b9'\] are not modules of SkipNet"):
        traced_view(SkipNet(), x, ["encoder.b9"])

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match=r"Tied uses \[.*weight'\] in two pipeline stages \(tied weights\)"):
        traced_view(Tied(), torch.randn(4, 8), ["b"])


# ---- through the Trainer (2 gloo processes) ----------------------------------------------------------------------
def _fit(rank, world_size, ckpt_dir):
    from lightning_distnn.strategies import PipelineStrategy

    module = _module()
    x, y = _data()
    strategy = PipelineStrategy(microbatches=MICRO, partition=CUT, timeout=120)
    trainer = quiet_trainer(strategy, devices=world_size, max_steps=STEPS)
    trainer.fit(module, datamodule=FixedDataModule(x, y, BATCH))
    trainer.save_checkpoint(ckpt_dir)
    state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    return dict(state=state, bytes=strategy.comm_bytes_per_step())


def _reference() -> dict:
    x, y = _data()
    order = sampler_order(len(x))
    x, y = x[order], y[order]
    ref = _module()
    opt = ref.configure_optimizers()
    ref.train()
    for step in range(STEPS):
        sl = slice(step * BATCH, (step + 1) * BATCH)
        opt.zero_grad()
        for xc, yc in zip(x[sl].chunk(MICRO), y[sl].chunk(MICRO)):
            (ref.loss_fn(ref(xc), yc) / MICRO).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in ref.net.state_dict().items()}


def test_traced_pp2_skip_across_the_cut_matches_one_process(tmp_path):
    ckpt = tmp_path / "traced.ckpt"
    results = run_distributed(_fit, 2, str(ckpt), timeout=300)
    expected = _reference()
    initial = _module().net.state_dict()
    assert max((expected[k].float() - initial[k].float()).abs().max().item() for k in expected) > 1e-3
    assert set(results[0]["state"]) == {k for k in expected if k.startswith(("stem.", "encoder.b1."))}
    merged = {**results[0]["state"], **results[1]["state"]}
    assert set(merged) == set(expected)
    assert_state_dicts_close(merged, expected, atol=1e-5)  # weights and BatchNorm running statistics
    # two tensors cross the cut (block output + skip), packed: 2 x 4 x 8 x 8 floats per sample, both ways
    assert results[0]["bytes"]["sent"] == MICRO * (BATCH // MICRO) * (2 * 4 * IMAGE * IMAGE) * 4
    full = _module(seed=7)
    load_distributed(ckpt, full)
    assert_state_dicts_close(dict(full.net.state_dict()), expected, atol=1e-5)
