"""SQLite and image-folder loading: round trip, workers, errors, converter, a data-parallel run."""

import sqlite3

import pytest
import torch
from torch.utils.data import DataLoader

import lightning_distnn  # noqa: F401
from lightning_distnn.data import ImageFolderDataModule, ImageFolderDataset, SQLiteDataModule, SQLiteDataset, export_image_folder, write_sqlite
from lightning_distnn.data.sqlite import main as sqlite_main
from lightning_distnn.testing import run_distributed
from lightning_distnn.testing.equivalence import digits_tensors

pytestmark = pytest.mark.xdist_group("test_sqlite")  # its tests share a module fixture: one worker

N, IMAGE = 96, 8


@pytest.fixture(scope="module")
def tensors():
    return digits_tensors(N, image_size=IMAGE)


@pytest.fixture(scope="module")
def database(tmp_path_factory, tensors):
    x, y = tensors
    path = tmp_path_factory.mktemp("db") / "digits.sqlite"
    return write_sqlite(path, {"train": (x[:64], y[:64]), "val": (x[64:80], y[64:80]), "test": (x[80:], y[80:])}, num_classes=10)


def test_round_trip_and_batched_queries(database, tensors):
    x, y = tensors
    ds = SQLiteDataset(database, "train")
    assert len(ds) == 64 and ds.shape == (3, IMAGE, IMAGE)
    img, label = ds[5]
    assert torch.equal(img, x[5]) and label == int(y[5])
    assert torch.equal(ds.targets, y[:64])
    ds.read_log = []
    batch = ds.__getitems__([3, 7, 3])  # duplicates (padding) allowed, one query
    assert [b[1] for b in batch] == [int(y[3]), int(y[7]), int(y[3])]
    assert ds.read_log == [3, 7]
    test = SQLiteDataset(database, "test")
    assert torch.equal(test[0][0], x[80])


def test_workers_open_their_own_connections(database, tensors):
    x, y = tensors
    ds = SQLiteDataset(database, "train")
    loader = DataLoader(ds, batch_size=10, num_workers=2, shuffle=False)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), x[:64]) and torch.equal(torch.cat(ys), y[:64])


class _Tracing(SQLiteDataset):
    """Each sample also tells which process read it through which connection object."""

    def __getitem__(self, index):
        import os

        img, label = super().__getitem__(index)
        return img, label, os.getpid(), id(self.connection())

    def __getitems__(self, indices):
        return [self[i] for i in indices]


def test_forked_workers_do_not_reuse_the_parents_open_connection(database, tensors):
    import os

    x, y = tensors
    ds = _Tracing(database, "train")
    _, _, parent_pid, parent_conn = ds[0]  # the parent opens a connection before the workers fork
    assert parent_pid == os.getpid()
    loader = DataLoader(ds, batch_size=10, num_workers=2, shuffle=False, multiprocessing_context="fork")
    xs, ys, pids, conns = zip(*loader)
    assert torch.equal(torch.cat(xs), x[:64]) and torch.equal(torch.cat(ys), y[:64])
    pids, conns = torch.cat(pids).tolist(), torch.cat(conns).tolist()
    assert parent_pid not in pids and len(set(pids)) == 2
    # a forked worker inherits the parent's connection object at the same address: it must open its own
    assert parent_conn not in conns
    img, label, _, conn = ds[5]  # and the parent's connection still answers afterwards
    assert conn == parent_conn and torch.equal(img, x[5])


def test_errors_name_the_problem_and_the_fix(tmp_path, database):
    with pytest.raises(FileNotFoundError, match="distnn-to-sqlite"):
        SQLiteDataset(tmp_path / "missing.sqlite")
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="corrupt"):
        SQLiteDataset(corrupt)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE images (id INTEGER, pixels BLOB)")
    with pytest.raises(ValueError, match="table samples is missing"):
        SQLiteDataset(other)
    with pytest.raises(ValueError, match="no split 'holdout'"):
        SQLiteDataset(database, "holdout")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_sqlite(database, {"train": (torch.zeros(1, 1), torch.zeros(1))}, num_classes=1)
    # a row whose blob has the wrong size
    broken = tmp_path / "broken.sqlite"
    write_sqlite(broken, {"train": (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))}, num_classes=1)
    with sqlite3.connect(broken) as conn:
        conn.execute("UPDATE samples SET image = x'00' WHERE idx = 1")
    with pytest.raises(ValueError, match="row .* holds 1 bytes"):
        SQLiteDataset(broken)[1]


def test_converter_command(tmp_path, capsys):
    out = tmp_path / "d.sqlite"
    assert sqlite_main(["convert", "--source", "digits", "--out", str(out), "--image-size", "8"]) == 0
    assert sqlite_main(["info", str(out)]) == 0
    assert '"train": 1258' in capsys.readouterr().out
    dm = SQLiteDataModule(path=str(out), partition="stratified")
    dm.setup()
    assert len(dm.train_set) == 1258 and dm.image_shape == (3, 8, 8)
    with pytest.raises(SystemExit):
        sqlite_main(["--source", "mnist", "--out", str(out)])


def test_a_users_own_table_or_csv(tmp_path, capsys):
    """``--source query`` (any SQL on any SQLite file) and ``--source csv``: numeric feature columns, a label
    column of any values; each becomes our schema, so every rank then reads only its shard of it."""
    import csv as csv_module

    rows = [(i, 20.0 + i, 1000.0 * (i % 7), ["bronze", "gold", "silver"][i % 3]) for i in range(50)]
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, age REAL, income REAL, segment TEXT)")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", rows)
    with open(tmp_path / "shop.csv", "w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["age", "income", "segment"])
        writer.writerows(r[1:] for r in rows)
    short = tmp_path / "short.csv"
    short.write_text("age,income,segment\n20,1000,gold\n21,silver\n")
    common = ["--label", "segment", "--val-fraction", "0.2", "--test-fraction", "0.2"]
    query = ["--source", "query", "--db", str(db), "--query", "SELECT age, income, segment FROM customers"]
    assert sqlite_main([*query, *common, "--out", str(tmp_path / "q.sqlite")]) == 0
    assert sqlite_main(["--source", "csv", "--csv", str(tmp_path / "shop.csv"), *common, "--out", str(tmp_path / "c.sqlite")]) == 0
    assert "bronze, gold, silver" in capsys.readouterr().out  # the classes, in label order
    q, c = SQLiteDataset(tmp_path / "q.sqlite"), SQLiteDataset(tmp_path / "c.sqlite")
    assert len(q) == len(c) == 30 and tuple(q.shape) == (2,) and q.num_classes == 3
    for i in range(len(q)):
        (xq, yq), (xc, yc) = q[i][:2], c[i][:2]
        assert torch.equal(xq, xc) and yq == yc
        assert ["bronze", "gold", "silver"][yq] == rows[int(xq[0]) - 20][3]  # the row's own label
    dm = SQLiteDataModule(path=str(tmp_path / "q.sqlite"), partition="stratified", batch_size=10)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 2) and y.dtype == torch.long
    # bad input: exit 2 with one line naming the fix
    for argv, says in [
        ([*query, "--label", "tier"], "no column 'tier'"),
        (["--source", "query", "--db", str(db), "--query", "SELECT * FROM customers", "--label", "segment"], None),
        (["--source", "query", "--db", str(db), "--query", "SELECT age, segment FROM shop", "--label", "segment"],
         "no such table: shop"),
        (["--source", "query", "--db", str(db), "--query", "SELECT segment, age FROM customers", "--label", "age"],
         "column 'segment' holds 'bronze', not a number"),
        (["--source", "csv", "--label", "segment"], "needs --csv FILE"),
        (["--source", "csv", "--csv", str(short), "--label", "segment"], "row 1: 2 values for 3 columns"),
    ]:
        code = sqlite_main([*argv, "--out", str(tmp_path / "x.sqlite"), "--overwrite"])
        if says is None:  # every column but the label is a feature, the integer id too
            assert code == 0 and tuple(SQLiteDataset(tmp_path / "x.sqlite").shape) == (3,)
        else:
            assert code == 2 and says in capsys.readouterr().err


def test_image_folder(tmp_path, tensors):
    x, y = tensors
    root = export_image_folder(x[:30], y[:30], tmp_path / "images")
    ds = ImageFolderDataset(root, image_size=IMAGE)
    assert len(ds) == 30 and sorted(ds.targets) == sorted(y[:30].tolist())
    img, label = ds[0]
    source = int(ds.samples[0][0].stem)  # export_image_folder names files by sample index
    assert img.shape == (3, IMAGE, IMAGE) and label == int(y[source])
    assert (img - x[source]).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit PNG round trip
    dm = ImageFolderDataModule(root=str(root), image_size=IMAGE, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 30
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    # the converter takes image folders too
    out = tmp_path / "f.sqlite"
    sqlite_main(["--source", "image_folder", "--root", str(root), "--image-size", str(IMAGE), "--out", str(out)])
    assert sum(len(SQLiteDataset(out, s)) for s in ("train", "val", "test")) == 30


def _dp_from_sqlite(rank, world_size, path, steps):
    from lightning_distnn.strategies import DataParallelStrategy
    from lightning_distnn.testing.equivalence import quiet_trainer, tiny_classifier

    # each rank starts with a different data seed: the sampler must take rank 0's
    dm = SQLiteDataModule(path=path, batch_size=8, partition="stratified", seed=11 + rank)
    trainer = quiet_trainer(DataParallelStrategy(timeout=60), devices=world_size, max_steps=steps)
    dm.trainer = trainer
    dm.setup()
    dm.train_set.read_log = []
    trainer.fit(tiny_classifier(image_size=IMAGE, pool_after=[1, 2]), datamodule=dm)
    sampler = trainer.train_dataloader.sampler
    return {
        "read": list(dm.train_set.read_log),
        "shard": list(sampler.shards(0)[rank]),
        "seed": sampler.seed,
        "report": dm.partition_report,
    }


@pytest.mark.slow
def test_data_parallel_run_reads_only_its_shard(database):
    steps = 4  # 64 train samples / (2 ranks x 8) = one epoch
    results = run_distributed(_dp_from_sqlite, 2, str(database), steps, timeout=240)
    shards = [set(r["read"]) for r in results]
    assert all(sorted(r["read"]) == sorted(r["shard"]) for r in results)  # only its own rows, each once
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(64))
    assert results[0]["seed"] == results[1]["seed"] == 11
    report = results[0]["report"]
    assert report is not None and report.partitioner == "stratified" and report.size_spread <= 1
