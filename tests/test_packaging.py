"""The wheel is what a user gets from ``pip install .``: it carries the Hydra configs, and
``distnn-train`` runs from any directory in a fresh venv (issue 10, item 6).

The venv sees the already-installed torch/lightning (``--system-site-packages``) and gets the
wheel with ``--no-deps --no-index``: no network, seconds instead of a 1 GB download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_packaging")]  # one wheel build, one worker


def _source_tree(dst: Path) -> Path:
    """The files ``git`` would commit (tracked + new, not ignored): a clean tree to build from, so the
    build leaves no ``build/`` or ``*.egg-info`` in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True
    )
    if listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): copy what is there
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "outputs"))
        return dst
    for name in filter(None, listed.stdout.split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = _source_tree(root / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (root / "dist").glob("lightning_distnn-*.whl")
    return whl


def test_wheel_carries_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lightning_distnn/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith(("conf/", "tests/", "recipes/")) for n in names)  # nothing outside the package


def test_installed_wheel_runs_from_any_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: the system's pip (visible through the system site-packages) installs into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no conf/ here or above: the configs must come from the wheel
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import lightning_distnn.train as t; print(t.__file__); print(t.CONF_DIR)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, conf_dir = where.stdout.split()
    # the venv's copy, not the checkout (or an editable install) that the system site-packages may also hold
    assert Path(module_file).is_relative_to(venv) and Path(conf_dir).is_relative_to(venv), where.stdout
    run = subprocess.run(
        [str(bin_dir / "distnn-train"), "experiment=quick", "hydra.run.dir=run"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=540,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0.0 <= metrics["test/acc"] <= 1.0


# modules that import private torch/Lightning names themselves, and say why in their docstrings
OWN_PRIVATE_IMPORTS = {
    "parallel/pipeline/overlap.py",  # built on torch's private pipeline action runtime throughout
    "testing/wire.py",  # a test utility: torch's dispatch mode records functional collectives
}


def test_private_apis_are_imported_in_compat_only():
    """``_compat.py`` is the one place that touches private Lightning/torch names (its docstring says
    so); a new private import elsewhere fails here, naming the file and the name."""
    import ast

    root = Path(__file__).resolve().parents[1] / "lightning_distnn"
    found = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if rel == "_compat.py" or rel in OWN_PRIVATE_IMPORTS:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "lightning"):
                names = [node.module] + [a.name for a in node.names]
                private = [n for n in names if any(part.startswith("_") for part in n.split("."))]
                if private:
                    found.append(f"{rel}:{node.lineno} imports {', '.join(private)}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ("torch", "lightning") and any(p.startswith("_") for p in a.name.split(".")):
                        found.append(f"{rel}:{node.lineno} imports {a.name}")
    assert not found, "private names outside lightning_distnn/_compat.py (move them there, with versions):\n" + "\n".join(found)
