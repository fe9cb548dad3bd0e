"""Checkpoints that cannot be half-written: temp dir + rename, manifest, newest complete, clear load errors."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_distnn.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    check_checkpoint,
    load_distributed,
    newest_complete_checkpoint,
    save_distributed,
    save_distributed_async,
    scan_checkpoints,
)
from lightning_distnn.testing.equivalence import tiny_classifier

WIDTH = dict(conv_filters=8, fc_width=16, image_size=16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(seed=0, **kw):
    return tiny_classifier(seed=seed, **{**WIDTH, **kw})


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_save_writes_manifest_and_no_partial(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = save_distributed(tmp_path / "step-3", model, [opt], extra={"global_step": 3}, layout="one process")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 3 and manifest["layout"] == "one process"
    assert manifest["signature"]["net.0.0.weight"] == [8, 3, 3, 3]
    assert {".metadata", "meta.pt"} <= set(manifest["files"])
    assert check_checkpoint(path) == []
    other = _model(seed=1)
    assert load_distributed(path, other)["global_step"] == 3
    for k, v in _weights(model).items():
        assert torch.equal(other.state_dict()[k], v), k


def test_overwrite_keeps_one_whole_checkpoint(tmp_path):
    a, b = _model(seed=0), _model(seed=1)
    save_distributed(tmp_path / "last", a, extra={"global_step": 1})
    save_distributed(tmp_path / "last", b, extra={"global_step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    c = _model(seed=2)
    load_distributed(tmp_path / "last", c)
    assert torch.equal(c.net[0][0].weight, b.net[0][0].weight)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import lightning_distnn.checkpoint as ck
    from lightning_distnn.testing.equivalence import tiny_classifier
    model = tiny_classifier(conv_filters=8, fc_width=16, image_size=16)
    ck.save_distributed({root!r} + "/step-10", model, extra={{"global_step": 10}})
    def die(*args, **kwargs):  # the data of step 20 is on disk, its completion is not
        os.kill(os.getpid(), signal.SIGKILL)
    ck.{hook} = die
    ck.save_distributed({root!r} + "/step-20", model, extra={{"global_step": 20}})
    """
)


@pytest.mark.parametrize("hook", ["_finalize", "_crc32"])
def test_writer_killed_mid_save_leaves_previous_as_newest(tmp_path, hook, caplog):
    script = _KILLED_WRITER.format(repo=REPO, root=str(tmp_path), hook=hook)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "step-10").is_dir() and not (tmp_path / "step-20").exists()
    assert (tmp_path / ".step-20.partial" / ".metadata").is_file()  # DCP finished; the rename never happened
    with caplog.at_level(logging.WARNING, logger="lightning_distnn.checkpoint"):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "step-10"
    assert ".step-20.partial" in caplog.text and "did not finish" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"\.step-20\.partial exists: its writer did not finish"):
        load_distributed(tmp_path / "step-20", _model())


def test_checkpoint_without_manifest_is_skipped(tmp_path, caplog):
    save_distributed(tmp_path / "step-1", _model(), extra={"global_step": 1})
    save_distributed(tmp_path / "step-2", _model(), extra={"global_step": 2})
    os.remove(tmp_path / "step-2" / MANIFEST_FILE)
    with caplog.at_level(logging.WARNING, logger="lightning_distnn.checkpoint"):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "step-1"
    assert "step-2/manifest.json is missing" in caplog.text


def _flip_byte(file, offset=-20):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_corrupt_file_is_skipped_and_named(tmp_path, caplog):
    save_distributed(tmp_path / "step-1", _model(), extra={"global_step": 1})
    save_distributed(tmp_path / "step-2", _model(), extra={"global_step": 2})
    data = tmp_path / "step-2" / "__0_0.distcp"
    _flip_byte(data)
    with caplog.at_level(logging.WARNING, logger="lightning_distnn.checkpoint"):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "step-1"
    assert f"{data} is corrupt" in caplog.text
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is corrupt: its CRC32"):
        load_distributed(tmp_path / "step-2", _model())
    statuses = scan_checkpoints(tmp_path)
    assert [(s.path.name, s.complete) for s in statuses] == [("step-1", True), ("step-2", False)] or [
        (s.path.name, s.complete) for s in statuses
    ] == [("step-2", False), ("step-1", True)]


def test_truncated_file_named_without_crc(tmp_path):
    path = save_distributed(tmp_path / "c", _model())
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    assert "truncated" in check_checkpoint(path, verify=False)[0]
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has 100 bytes"):
        load_distributed(path, _model(), verify=False)


def test_corrupt_metadata_without_manifest_names_the_file(tmp_path):
    path = save_distributed(tmp_path / "c", _model())
    os.remove(path / MANIFEST_FILE)  # an old-style checkpoint: nothing to check against but the files themselves
    (path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"c/\.metadata cannot be read"):
        load_distributed(path, _model())


def test_corrupt_data_without_manifest_names_the_files(tmp_path):
    path = save_distributed(tmp_path / "c", _model())
    os.remove(path / MANIFEST_FILE)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp"):
        load_distributed(path, _model())


def test_foreign_model_names_parameter_and_shapes(tmp_path):
    path = save_distributed(tmp_path / "c", _model())
    wider = tiny_classifier(seed=0, conv_filters=16, fc_width=16, image_size=16)
    with pytest.raises(CheckpointError) as err:
        load_distributed(path, wider)
    msg = str(err.value)
    assert "saved from another model" in msg and "net.0.0.weight: saved [8, 3, 3, 3], this model has [16, 3, 3, 3]" in msg
    assert ".metadata" in msg


def test_foreign_names_listed(tmp_path):
    path = save_distributed(tmp_path / "c", _model())
    deeper = tiny_classifier(seed=0, conv_layers=6, **WIDTH)
    with pytest.raises(CheckpointError, match=r"it lacks \d+ tensors of this model \(first: net\.5"):
        load_distributed(path, deeper)


def test_async_save_snapshots_the_state(tmp_path):
    model = _model()
    before = _weights(model)
    future = save_distributed_async(tmp_path / "a", model, extra={"global_step": 5})
    with torch.no_grad():  # training goes on while the writer works
        for p in model.parameters():
            p.add_(1.0)
    assert future.result(timeout=120) == tmp_path / "a"
    assert check_checkpoint(tmp_path / "a") == [] and not (tmp_path / ".a.partial").exists()
    restored = _model(seed=3)
    assert load_distributed(tmp_path / "a", restored)["global_step"] == 5
    for k, v in before.items():
        assert torch.equal(restored.state_dict()[k], v), k
