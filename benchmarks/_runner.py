"""Run ``distnn-train`` configurations as subprocesses and collect their metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any


def run_train(overrides: list[str], timeout: float = 1800) -> dict[str, Any]:
    """One ``python -m lightning_distnn.train`` run in a temporary directory; returns its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "lightning_distnn.train", *overrides, f"hydra.run.dir={tmp}/run"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return json.loads((Path(tmp) / "run" / "metrics.json").read_text())


def interleaved(configs: dict[str, list[str]], repeats: int, key: str = "images_per_s") -> dict[str, list[float]]:
    """Run every config ``repeats`` times, round-robin (A B A B ...), so drift hits all alike."""
    values: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(repeats):
        for name, overrides in configs.items():
            metrics = run_train(overrides)
            values[name].append(float(metrics[key]))
            print(f"  run {i + 1}/{repeats} {name}: {key}={values[name][-1]:.4g}", flush=True)
    return values


def summary(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}
