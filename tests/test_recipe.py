"""The case-study recipe at toy size: all three layouts (data, model, hybrid) end to end."""

import json

import pytest

from recipes.case_study.run import main


@pytest.mark.slow
def test_case_study_recipe_toy(tmp_path):
    rows = main(["--mode", "toy", "--out", str(tmp_path)])
    assert [r["layout"] for r in rows] == ["data", "model", "hybrid"]
    assert [r["strategy"] for r in rows] == ["DataParallelStrategy", "PipelineStrategy", "HybridStrategy"]
    assert [r["processes"] for r in rows] == [2, 2, 4]
    for r in rows:
        assert 0.0 <= r["test acc"] <= 1.0 and r["images/s"] > 0
        assert r["bytes sent/step (max rank)"] > 0
    # model-parallel layouts hold a share of the parameters per rank, data parallel the whole model
    assert rows[0]["params/rank (max)"] == rows[0]["params/rank (min)"]
    assert rows[1]["params/rank (max)"] < rows[0]["params/rank (max)"]
    assert 0.0 <= rows[1]["bubble measured"] <= 1.0 and 0.0 < rows[1]["bubble theory"] < 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(rows, default=str))
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| layout |" in (tmp_path / "results.md").read_text()
