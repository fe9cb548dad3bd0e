"""The case-study recipe at toy size: all three layouts (data, model, hybrid) end to end."""

import json

import pytest

from recipes.case_study.run import RESULTS, main


def _committed():
    return {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()}


@pytest.mark.slow
def test_case_study_recipe_toy(tmp_path, monkeypatch):
    committed = _committed()
    monkeypatch.chdir(tmp_path)
    rows = main(["--mode", "toy"])  # no --out: a scratch directory under ./outputs/case_study/
    (out,) = (tmp_path / "outputs" / "case_study").iterdir()
    assert _committed() == committed, "a toy run changed the committed results in recipes/case_study/results/"
    assert [r["layout"] for r in rows] == ["data", "model", "hybrid"]
    assert all(isinstance(r["strategy"], str) and r["strategy"] for r in rows)  # describe() or the class name
    assert [r["processes"] for r in rows] == [2, 2, 4]
    for r in rows:
        assert 0.0 <= r["test acc"] <= 1.0 and r["images/s"] > 0
        assert r["bytes sent/step (max rank)"] > 0
    # model-parallel layouts hold a share of the parameters per rank, data parallel the whole model
    assert rows[0]["params/rank (max)"] == rows[0]["params/rank (min)"]
    assert rows[1]["params/rank (max)"] < rows[0]["params/rank (max)"]
    assert 0.0 <= rows[1]["bubble measured"] <= 1.0 and 0.0 < rows[1]["bubble theory"] < 1.0
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows, default=str))
    assert (out / "results.png").stat().st_size > 0
    assert "| layout |" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.glob("*.log")) == ["data.log", "hybrid.log", "model.log"]


def test_toy_run_cannot_update_committed_results(capsys):
    with pytest.raises(SystemExit):
        main(["--mode", "toy", "--update-results"])
    assert "must not overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["cpu", "full", "toy"])
def test_dry_run_composes_every_layout(mode, capsys):
    assert main(["--mode", mode, "--dry-run"]) == []
    out = capsys.readouterr().out
    for layout, devices in (("data", 10), ("model", 5), ("hybrid", 10)) if mode != "toy" else (("data", 2), ("model", 2), ("hybrid", 4)):
        assert f"{layout}: distnn-train experiment=case_study_{layout}" in out
        assert f"devices {devices} x nodes 1" in out
