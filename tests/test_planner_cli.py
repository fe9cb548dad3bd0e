"""``distnn-plan``: the ranked table, JSON, a model that fits no layout, and measuring on 2 processes; link probes."""

import json
import re

import pytest

from lightning_distnn.planner.cli import main, parse_bytes, parse_layout

TINY = ["--conv-filters", "4", "--fc-width", "8", "--image-size", "16", "--repeats", "1"]


def test_parse_sizes_and_layouts():
    assert parse_bytes("2GB") == 2e9 and parse_bytes("64KiB") == 65536 and parse_bytes("1e6") == 1e6
    assert parse_layout("dp=2,pp=5,schedule=1f1b") == {"dp": 2, "pp": 5, "schedule": "1f1b"}


def test_cli_prints_ranked_table_and_seed_sums(capsys, tmp_path):
    code = main(["--world-size", "2", "--global-batch", "8", "--processes", "1", "--links", "assumed",
                 "--cache-dir", str(tmp_path), "--current", "pp=2,schedule=gpipe,microbatches=2", *TINY])
    out = capsys.readouterr().out
    assert code == 0
    assert "| rank | layout | step ms | images/s | MB/rank | MB sent/step |" in out
    assert "T = T_0 + T_1 + T_2" in out and "S = S_1 + S_2 + S_3" in out
    assert "run it with:" in out and "your layout pp2 gpipe m=2" in out


def test_cli_json(capsys, tmp_path):
    assert main(["--world-size", "2", "--global-batch", "8", "--processes", "1", "--links", "assumed", "--json",
                 "--cache-dir", str(tmp_path), *TINY]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and data["ranked"][0]["layout"] == data["best"]["layout"]
    assert data["best"]["strategy"]["name"].startswith("distnn_")
    assert set(data["best"]["terms"]) == {"T_0", "T_1", "T_2", "S_1", "S_2", "S_3"}


USER_NETS = """
import torch
from torch import nn


def mlp(width=16):
    return nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(20, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(h + torch.relu(self.b(h)))


def residual():
    return Residual()
"""


def test_cli_plans_a_users_own_network(capsys, tmp_path, monkeypatch):
    (tmp_path / "distnn_user_nets.py").write_text(USER_NETS)
    monkeypatch.chdir(tmp_path)  # the user's module sits in the current directory, as with python -m
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    common = ["--input-shape", "20", "--world-size", "2", "--global-batch", "16", "--processes", "1", "--links",
              "assumed", "--no-cache", "--json"]
    assert main(["--model", "distnn_user_nets:mlp", "--model-kwargs", '{"width": 32}', *common]) == 0
    data = json.loads(capsys.readouterr().out)
    layouts = {row["layout"] for row in data["ranked"]}
    assert {"dp2", "tp2"} <= layouts and any(label.startswith("pp2") for label in layouts)
    assert data["best"]["memory_terms"]["M_1"] > 32 * 32 * 4  # the 32-wide hidden layer was built
    assert main(["--model", "distnn_user_nets:residual", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {row["layout"] for row in data["ranked"]} == {"dp2", "dp2 fp16", "dp2 ps", "dp2 ps fp16"}
    assert any("Residual is not a chain of layers" in note for note in data["notes"])
    for argv, message in (
        (["--model", "distnn_user_nets:nope"], "distnn_user_nets has no function 'nope'"),
        (["--model", "no_such_module_here:f"], "cannot import 'no_such_module_here'"),
        (["--model", "distnn_user_nets:mlp", "--model-kwargs", '{"wdth": 3}'], "unexpected keyword argument 'wdth'"),
        (["--model", "resnet50"], "write one of case_study, seed_net, resnet or module:function"),
        (["--model", "distnn_user_nets:mlp", "--input-shape", "2x3"], "--input-shape '2x3': write one sample's shape"),
        (["--model", "distnn_user_nets:residual", "--current", "tp=2"], "--current: pp=1, tp=2: Residual is not a chain"),
        (["--model", "distnn_user_nets:mlp", "--current", "pp=2,schedule=interleaved_1f1b,stages_per_rank=3"],
         "--current: 6 pipeline stages need at least 6 layers, the model has 5"),
    ):
        assert main([*common, *argv]) == 2
        assert message in capsys.readouterr().err


def test_cli_model_that_fits_no_layout_says_which_knob(capsys):
    code = main(["--world-size", "2", "--global-batch", "8", "--processes", "1", "--links", "assumed", "--no-cache",
                 "--max-memory-per-rank", "1KB", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "no layout fits max_memory_per_rank=0.001 MB on 2 processes" in err
    assert "raise max_memory_per_rank (--max-memory-per-rank) to at least" in err


def _links(rank, world_size):
    from lightning_distnn.planner.links import measure_network

    return measure_network(repeats=2, sizes=(1 << 10, 1 << 16)).to_dict()


@pytest.mark.slow
def test_links_measured_in_two_processes_agree():
    from lightning_distnn.testing import run_distributed

    results = run_distributed(_links, 2, init_process_group=True, timeout=120)
    assert results[0] == results[1]
    link = results[0]["intra"]
    assert link["latency"] >= 0 and 0 < link["bandwidth"] < float("inf") and results[0]["measured"]
    assert results[0]["compress_s_per_byte"] >= 0  # fp16 compression's own cost, measured with the links
    # tensor parallel's own time per collective (DTensor on a sharded Linear pair), measured with the links
    assert 0 <= results[0]["tp_collective_s"] < 1.0
    from lightning_distnn.planner import Network

    assert Network.from_dict(results[0]).tp_collective_s == results[0]["tp_collective_s"]


@pytest.mark.slow
def test_cli_profiles_and_measures_on_two_processes(capsys, tmp_path):
    code = main(["--world-size", "2", "--global-batch", "8", "--cache-dir", str(tmp_path), "--measure", "1",
                 "--steps", "2", "--json", *TINY])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["network"]["measured"] is True
    (label, measured), = data["measured"].items()
    assert label == data["best"]["layout"] and measured["step_s"] > 0 and len(measured["samples"]) == 2
    assert data["calibration"]["fitted_on"] == 1
    assert list(tmp_path.glob("calibration-*.json"))  # the next plan on this machine starts calibrated


def _plan_inside(rank, world_size, cache_dir):
    import torch

    from lightning_distnn.models import CaseStudyCNN
    from lightning_distnn.planner import plan_layout

    torch.manual_seed(0)
    net = CaseStudyCNN(conv_filters=4, fc_width=8, image_size=16)
    x = torch.randn(1, 3, 16, 16)
    first = plan_layout(net, x, world_size=world_size, global_batch=8, cache_dir=cache_dir, repeats=1,
                        microbatch_sizes=(1, 2))
    second = plan_layout(net, x, world_size=world_size, global_batch=8, cache_dir=cache_dir, repeats=1,
                         microbatch_sizes=(1, 2))
    return first.strategy_kwargs(), first.best.step_s, second.notes[-1], first.profile.profiled_in, first.network.measured


@pytest.mark.slow
def test_plan_inside_the_training_processes_is_the_same_on_every_rank(tmp_path):
    """What a distnn_auto strategy does at setup: every rank plans at once and gets the same plan."""
    from lightning_distnn.testing import run_distributed

    results = run_distributed(_plan_inside, 2, str(tmp_path), init_process_group=True, timeout=300)
    (kw0, step0, note0, procs, measured), (kw1, step1, note1, _, _) = results
    assert kw0 == kw1 and step0 == step1
    assert procs == 2 and measured  # profiled by both ranks at once, links measured on the real group
    assert "cache" in note0 and "cache" in note1


@pytest.mark.parametrize("argv,match", [
    (["--world-size", "2"], r"--world-size 2 but the launcher started 4 processes \(WORLD_SIZE=4\).*--world-size 4"),
    (["--world-size", "4", "--ranks-per-node", "1"], r"--ranks-per-node 1 but torchrun runs 2 per node"),
])
def test_cli_under_torchrun_refuses_a_world_that_is_not_the_jobs(monkeypatch, capsys, argv, match):
    """Under torchrun the job's processes are the world: a different one is refused before any group is made."""
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2"), monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert main([*argv, "--global-batch", "8", "--no-cache"]) == 2
    assert re.search(match, capsys.readouterr().err) and not dist.is_initialized()
