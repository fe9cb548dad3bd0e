"""Every shell command in README.md and docs/*.md works as written (issue 13).

The convention, for everyone who writes a command into the docs
-----------------------------------------------------------------
1. Commands meant to be copied go in fenced blocks tagged ``bash`` (``sh``, ``shell`` and ``console``
   count too): one command per line, ``\\`` continues a line, ``#`` starts a comment, ``&&`` chains.
   Blocks tagged ``python``, ``yaml`` or nothing (program output) are not run.
2. Every ``distnn-train`` line of every shell block must compose (Hydra) and instantiate its model,
   data module and strategy: a fast test, in this process.
3. By default a block also runs (the slow tests): its lines in order, in a scratch directory of its
   own (a line may use a file that an earlier line wrote; ``recipes/`` and ``benchmarks/`` are
   linked in, so repository-relative paths work), at toy size: ``distnn-train ...`` gets
   ``experiment=quick`` appended (``trainer=toy`` if the line names another experiment) and its own
   ``hydra.run.dir``, and must write ``metrics.json``. Identical runs run once. Any other command
   runs as written, so write it at a size that takes seconds, or mark the block.
4. A marker on the line right above the opening fence (an HTML comment: invisible on GitHub)
   changes what happens to the block; the reason in parentheses is required:

       <!-- doc-test: compose (needs a GPU and CIFAR-10) -->
           Nothing runs. ``distnn-train`` lines are composed as in 2; every other command runs
           with ``--help`` appended and must exit 0 and know every ``--option`` the line uses.
           For commands that need a GPU, a dataset that is not embedded, a network, or minutes.
       <!-- doc-test: skip (installs packages) -->
           Nothing runs (``distnn-train`` lines still compose). For installs and the test suite itself.

A mistyped marker, or a marker that is not right above a shell block, fails the fast test.
Cost: the fast tests take seconds; the slow ones (markers ``slow`` and ``docs``) one toy run of two to
four processes per distinct ``distnn-train`` line, about 15 runs: ``pytest -m "not docs"`` leaves them out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir

from lightning_distnn.train import CONF_DIR, build_strategy

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MODES = ("run", "compose", "skip")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<mode>\S+?)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")
FENCE = re.compile(r"^\s*```\s*(?P<lang>[\w+-]*)")
LINKED = ("recipes", "benchmarks")  # repository folders a block's scratch directory links to
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
TOY = "experiment=quick"


@dataclass(frozen=True)
class Block:
    """A fenced shell block of a doc file and what to do with it."""

    path: Path
    line: int  # 1-based line of the opening fence
    mode: str
    reason: str
    commands: tuple[str, ...]  # logical lines (continuations joined, comments kept for shlex)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclass(frozen=True)
class Invocation:
    """One command of a line (``a && b`` gives two): environment assignments and argv."""

    block: Block
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.block.id}: {' '.join(self.argv)}"


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The shell blocks of ``path`` and the problems found with markers."""
    lines = path.read_text().splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        marker = MARKER.match(lines[i])
        if marker and not (i + 1 < len(lines) and (f := FENCE.match(lines[i + 1])) and f["lang"] in SHELL_LANGS):
            problems.append(f"{path.name}:{i + 1}: a doc-test marker must be the line right above a ```bash fence")
        if not fence:
            i += 1
            continue
        start, lang = i, fence["lang"]
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in SHELL_LANGS:
            continue
        mode, reason = "run", ""
        above = MARKER.match(lines[start - 1]) if start > 0 else None
        if above:
            mode, reason = above["mode"], (above["reason"] or "").strip()
            if mode not in MODES:
                problems.append(f"{path.name}:{start}: unknown doc-test mode {mode!r}; use one of {', '.join(MODES)}")
            elif mode != "run" and not reason:
                problems.append(f"{path.name}:{start}: say why in the marker: <!-- doc-test: {mode} (reason) -->")
        commands, current = [], ""
        for raw in body:
            current += raw.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            if current.strip() and not current.strip().startswith("#"):
                commands.append(current.strip().removeprefix("$ "))
            current = ""
        blocks.append(Block(path, start + 1, mode, reason, tuple(commands)))
    return blocks, problems


def invocations(block: Block) -> list[Invocation]:
    out = []
    for command in block.commands:
        tokens = shlex.split(command, comments=True)
        parts: list[list[str]] = [[]]
        for tok in tokens:
            if tok in ("&&", ";", "||"):
                parts.append([])
            else:
                parts[-1].append(tok)
        for part in parts:
            env = []
            while part and ENV_ASSIGNMENT.match(part[0]):
                key, _, value = part.pop(0).partition("=")
                env.append((key, value))
            if part:
                out.append(Invocation(block, tuple(env), tuple(part)))
    return out


ALL_BLOCKS: list[Block] = []
MARKER_PROBLEMS: list[str] = []
for _path in DOC_FILES:
    _blocks, _problems = parse_blocks(_path)
    ALL_BLOCKS += _blocks
    MARKER_PROBLEMS += _problems
ALL_INVOCATIONS = [inv for block in ALL_BLOCKS for inv in invocations(block)]
TRAIN_INVOCATIONS = [inv for inv in ALL_INVOCATIONS if inv.argv[0] == "distnn-train"]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.mode == "run"]


def program(inv: Invocation) -> tuple[str, ...]:
    """What ``--help`` is asked of: the command, or the interpreter and the script it runs."""
    return inv.argv[:2] if inv.argv[0] in ("python", "python3") else inv.argv[:1]


HELP_PROGRAMS: dict[tuple[str, ...], list[Invocation]] = {}
for _inv in ALL_INVOCATIONS:
    if _inv.block.mode == "compose" and _inv.argv[0] != "distnn-train":
        HELP_PROGRAMS.setdefault(program(_inv), []).append(_inv)


def hydra_overrides(argv: tuple[str, ...], *, toy: bool) -> list[str]:
    """The config overrides of a ``distnn-train`` command line (Hydra's own flags and ``hydra.*`` dropped;
    a multirun sweep ``a=1,2`` composes its first value), plus the toy-size override when ``toy``."""
    overrides, skip_next = [], False
    for arg in argv[1:]:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"):
            skip_next = True
            continue
        if arg.startswith("-") or arg.startswith("hydra.") or arg.startswith("hydra/"):
            continue
        key, _, value = arg.partition("=")
        if "-m" in argv or "--multirun" in argv:
            if "," in value and not any(c in value for c in "[]{}()"):
                value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    named = [o for o in overrides if o.lstrip("+").startswith("experiment=")]
    if toy and not named:
        overrides.append(TOY)
    elif toy and named != [TOY]:
        overrides.append("trainer=toy")
    return overrides


# ---------------------------------------------------------------------------- fast: markers, composition
def test_doc_markers_are_valid():
    assert not MARKER_PROBLEMS, "\n".join(MARKER_PROBLEMS)


def test_docs_have_runnable_commands():
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md"]
    assert any(b.mode == "run" for b in readme), "README.md has no runnable ```bash block: the parser lost them"
    assert any(inv.argv[0] == "distnn-train" for b in readme for inv in invocations(b))


def test_parser_reads_the_convention(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```bash\nA=1 distnn-train strategy=ps \\\n  trainer.devices=2   # comment\n# only a comment\n"
        "distnn-to-sqlite --out f && distnn-train data=sqlite\n```\n```\nnot run\n```\n"
        "<!-- doc-test: compose (needs a GPU) -->\n```sh\npython x.py --mode full\n```\n"
        "<!-- doc-test: skip -->\n```bash\npip install .\n```\n<!-- doc-test: compose (x) -->\n\n```bash\nls\n```\n"
    )
    blocks, problems = parse_blocks(doc)
    assert [(b.line, b.mode) for b in blocks] == [(2, "run"), (12, "compose"), (16, "skip"), (21, "run")]
    assert [inv.argv for inv in invocations(blocks[0])] == [
        ("distnn-train", "strategy=ps", "trainer.devices=2"),
        ("distnn-to-sqlite", "--out", "f"),
        ("distnn-train", "data=sqlite"),
    ]
    assert invocations(blocks[0])[0].env == (("A", "1"),)
    assert len(problems) == 2 and "say why" in problems[0] and "right above" in problems[1]
    assert hydra_overrides(("distnn-train", "-m", "seed=1,2", "hydra.run.dir=x", "--cfg", "job"), toy=True) == [
        "seed=1",
        TOY,
    ]
    assert hydra_overrides(("distnn-train", "experiment=case_study_data"), toy=True)[-1] == "trainer=toy"


@pytest.mark.parametrize("inv", TRAIN_INVOCATIONS, ids=lambda inv: inv.id)
def test_distnn_train_command_composes(inv):
    """As written (compose/skip blocks) or at toy size (run blocks): compose, then build model, data, strategy."""
    overrides = hydra_overrides(inv.argv, toy=inv.block.mode == "run")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert hydra.utils.instantiate(cfg.data) is not None
    assert hydra.utils.instantiate(cfg.model) is not None
    assert build_strategy(cfg.get("strategy")) is not None


# ---------------------------------------------------------------------------- slow: run them
SHIM = """#!/usr/bin/env bash
# doc-test shim: the documented {name} at toy size (tests/test_docs.py)
set -u
{body}
"""
SHIMS = {
    "distnn-train": """
extra=({toy})
for a in "$@"; do case "$a" in {toy}) extra=();; experiment=*|+experiment=*) extra=(trainer=toy);; esac; done
key=$(printf '%s\\n' "$@" "${{extra[@]}}" | sort -u | tr '\\n' ' ')
if grep -qxF -- "$key" "$DOCTEST_SEEN" 2>/dev/null; then echo "doc-test: ran already (or running) in another block: distnn-train $*"; exit 0; fi
echo "$key" >> "$DOCTEST_SEEN"   # at the start: a block on another worker skips it (a failing run fails its own block)
run_dir="$DOCTEST_RUNS/run_$(date +%s%N)"
"$DOCTEST_PYTHON" -m lightning_distnn.train "$@" "${{extra[@]}}" "hydra.run.dir=$run_dir" || exit $?
[ -f "$run_dir/metrics.json" ] || {{ echo "doc-test: no metrics.json in $run_dir" >&2; exit 3; }}
""",
    "distnn-to-sqlite": 'exec "$DOCTEST_PYTHON" -m lightning_distnn.data.sqlite "$@"',
    "python": 'exec "$DOCTEST_PYTHON" "$@"',
    "python3": 'exec "$DOCTEST_PYTHON" "$@"',
    "pip": 'echo "doc-test: pip in a runnable block: mark it <!-- doc-test: skip (installs) -->" >&2; exit 2',
    "pytest": 'echo "doc-test: pytest in a runnable block: mark it <!-- doc-test: skip (the test suite) -->" >&2; exit 2',
}


@pytest.fixture(scope="module")
def shim_env(tmp_path_factory):
    """PATH with the shims first, the repository importable, one record of the runs done so far."""
    root = tmp_path_factory.mktemp("doc_shims")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, body in SHIMS.items():
        shim = bin_dir / name
        shim.write_text(SHIM.format(name=name, body=body.format(toy=TOY) if name == "distnn-train" else body))
        shim.chmod(0o755)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["DOCTEST_PYTHON"] = sys.executable
    # one record for the whole session: under pytest-xdist every worker has a base directory of its own below the
    # session's, so the record lives one level up there (a run that another worker did is not repeated)
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    env["DOCTEST_SEEN"] = str(shared / "doc_runs_seen.txt")
    return env


def _scratch(tmp_path: Path) -> Path:
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.timeout(1800)  # a block of three 4-process runs on a loaded 2-core machine
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs(block, shim_env, tmp_path):
    cwd = _scratch(tmp_path)
    env = dict(shim_env, DOCTEST_RUNS=str(tmp_path / "runs"))
    for command in block.commands:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=540
        )
        assert proc.returncode == 0, (
            f"{block.id}: `{command}` exited with {proc.returncode} (at toy size, see tests/test_docs.py):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.parametrize("prog", list(HELP_PROGRAMS), ids=" ".join)
def test_doc_command_knows_its_options(prog, shim_env, tmp_path):
    """Commands of compose blocks: ``--help`` works and lists every ``--option`` the documented lines use."""
    cwd = _scratch(tmp_path)
    invs = HELP_PROGRAMS[prog]
    env = dict(shim_env, **{k: v for inv in invs for k, v in inv.env})
    proc = subprocess.run([*prog, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{invs[0].id}: --help exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    unknown = sorted(
        f"{opt} ({inv.id})"
        for inv in invs
        for opt in {arg.split("=")[0] for arg in inv.argv[len(prog):] if arg.startswith("--")}
        if opt not in proc.stdout
    )
    assert not unknown, f"options that {' '.join(prog)} --help does not list: {unknown}\n{proc.stdout[-3000:]}"
