"""Images and labels in an SQLite database: each rank queries only the rows of its shard.

Convert any supported dataset once, then train from the file::

    python -m lightning_distnn.data.sqlite convert --source digits --out data/digits.sqlite --image-size 32
    distnn-to-sqlite --source image_folder --root data/images --out data/images.sqlite
    python -m lightning_distnn.data.sqlite info data/digits.sqlite
    distnn-train data=sqlite data.path=data/digits.sqlite

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- format, version, shape, dtype, num_classes, ...
    samples(split TEXT, idx INTEGER, label INTEGER, image BLOB,
            PRIMARY KEY (split, idx)) WITHOUT ROWID  -- the index every query uses

``image`` holds the raw bytes of one ``shape``/``dtype`` tensor (C order). A batch is one query
(``idx IN (...)``, via the dataset's ``__getitems__``), and the sampler hands each rank only its
shard's indices, so no rank reads another rank's rows. The connection is opened lazily in the
process that reads (read-only, one per DataLoader worker process), never pickled.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distnn.data.base import ImageDataModule, split_indices

FORMAT = "lightning_distnn.sqlite"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
SPLITS = ("train", "val", "test")
SOURCES = ("digits", "synthetic", "cifar10", "image_folder", "query", "csv")
_MAX_PARAMS = 900  # stay below SQLite's host-parameter limit in one IN (...) query

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (
    split TEXT NOT NULL,
    idx INTEGER NOT NULL,
    label INTEGER NOT NULL,
    image BLOB NOT NULL,
    PRIMARY KEY (split, idx)
) WITHOUT ROWID;
"""
_COLUMNS = {"meta": {"key", "value"}, "samples": {"split", "idx", "label", "image"}}


def _fix_hint(path: Path) -> str:
    return f"Recreate it with: distnn-to-sqlite --source digits --out {path} --overwrite (or another --source)."


def open_database(path: str | Path) -> tuple[sqlite3.Connection, dict[str, Any]]:
    """Open ``path`` read-only, check format and schema; returns the connection and the metadata.

    Raises FileNotFoundError (missing), ValueError (not SQLite / corrupt / wrong schema or format).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SQLite dataset {path.resolve()} does not exist. Create it from a dataset with "
            f"`distnn-to-sqlite --source digits --out {path}` (sources: {', '.join(SOURCES)}), or fix data.path."
        )
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, check_same_thread=False)
        tables = {
            name: {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        }
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not a readable SQLite database ({err}): the file is corrupt or of another kind. {_fix_hint(path)}") from err
    problems = [
        f"table {t} lacks columns {sorted(cols - tables[t])}" if t in tables else f"table {t} is missing"
        for t, cols in _COLUMNS.items()
        if t not in tables or cols - tables[t]
    ]
    if problems:
        conn.close()
        raise ValueError(
            f"{path} is an SQLite database but not a lightning_distnn dataset: {'; '.join(problems)} "
            f"(expected tables meta(key, value) and samples(split, idx, label, image)). {_fix_hint(path)}"
        )
    try:
        meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as err:
        conn.close()
        raise ValueError(f"{path}: cannot read its meta table ({err}): the file is corrupt. {_fix_hint(path)}") from err
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        conn.close()
        raise ValueError(
            f"{path} has format={meta.get('format')!r} version={meta.get('version')!r}, expected {FORMAT!r} version "
            f"{VERSION}. {_fix_hint(path)}"
        )
    missing = [k for k in ("shape", "dtype", "num_classes", "splits") if k not in meta]
    if missing:
        conn.close()
        raise ValueError(
            f"{path}: its meta table lacks {', '.join(missing)} (it holds {', '.join(sorted(meta)) or 'nothing'}): the "
            f"database was not written completely. {_fix_hint(path)}"
        )
    try:
        info = {
            "shape": tuple(json.loads(meta["shape"])),
            "dtype": meta["dtype"],
            "num_classes": int(meta["num_classes"]),
            "splits": json.loads(meta["splits"]),
            "source": meta.get("source", "?"),
        }
        if not isinstance(info["splits"], dict) or info["num_classes"] < 1:
            raise ValueError("splits must be a JSON object and num_classes positive")
    except (ValueError, TypeError) as err:
        conn.close()
        raise ValueError(
            f"{path}: its meta table holds unreadable values (shape={meta['shape']!r}, num_classes="
            f"{meta['num_classes']!r}, splits={meta['splits']!r}: {err}). {_fix_hint(path)}"
        ) from err
    if info["dtype"] not in DTYPES:
        conn.close()
        raise ValueError(f"{path}: unknown image dtype {info['dtype']!r} (known: {', '.join(DTYPES)}). {_fix_hint(path)}")
    return conn, info


class SQLiteDataset(Dataset):
    """One split of an SQLite dataset; items are ``(image tensor, label)``.

    Checks the file when built (so a bad path fails in the launching process), then reads lazily:
    each process (each DataLoader worker) opens its own read-only connection on first use.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path).expanduser()
        conn, info = open_database(self.path)
        conn.close()
        if split not in info["splits"]:
            raise ValueError(f"{self.path} has no split {split!r}; it holds {sorted(info['splits'])}.")
        self.split = split
        self.shape = info["shape"]
        self.dtype = DTYPES[info["dtype"]]
        self.num_classes = info["num_classes"]
        self.length = int(info["splits"][split])
        self._check_labels()
        self._nbytes = torch.Size(self.shape).numel() * torch.empty(0, dtype=self.dtype).element_size()
        self._conn: Optional[sqlite3.Connection] = None
        self._pid: Optional[int] = None
        self._targets: Optional[torch.Tensor] = None
        self.rows_read = 0  # rows fetched by this process
        self.read_log: Optional[list[int]] = None  # set to a list to record every index fetched (tests)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_conn"], state["_pid"] = None, None  # connections never cross processes
        return state

    def connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._conn, _ = open_database(self.path)
            self._pid = os.getpid()
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def _check_labels(self) -> None:
        """One query on the index: a label outside ``0..num_classes-1`` fails here, naming its row, on every rank
        alike (not as a raw index error on the rank that reads it and a gloo error on the others)."""
        conn, _ = open_database(self.path)
        try:
            row = conn.execute(
                "SELECT idx, label FROM samples WHERE split = ? AND (label < 0 OR label >= ?) ORDER BY idx LIMIT 1",
                (self.split, self.num_classes),
            ).fetchone()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: query failed ({err}): the database is corrupt. {_fix_hint(self.path)}") from err
        finally:
            conn.close()
        if row is not None:
            raise ValueError(
                f"{self.path}: row ({self.split}, {row[0]}) has label {row[1]}, outside num_classes={self.num_classes} "
                f"(meta table): the labels must be 0..{self.num_classes - 1}. Fix the row, or the meta table's "
                f"num_classes. {_fix_hint(self.path)}"
            )

    def __len__(self) -> int:
        return self.length

    def _decode(self, idx: int, blob: bytes) -> torch.Tensor:
        if len(blob) != self._nbytes:
            raise ValueError(
                f"{self.path}: row ({self.split}, {idx}) holds {len(blob)} bytes, expected {self._nbytes} for shape "
                f"{self.shape} {self.dtype}: the database is corrupt. {_fix_hint(self.path)}"
            )
        return torch.frombuffer(bytearray(blob), dtype=self.dtype).view(self.shape).float()

    def _fetch(self, indices: Sequence[int]) -> dict[int, tuple[int, bytes]]:
        for i in indices:
            if not 0 <= i < self.length:
                raise IndexError(f"index {i} out of range for split {self.split!r} of {self.length} samples")
        conn = self.connection()
        wanted = sorted(set(int(i) for i in indices))
        rows: dict[int, tuple[int, bytes]] = {}
        try:
            for start in range(0, len(wanted), _MAX_PARAMS):
                chunk = wanted[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT idx, label, image FROM samples WHERE split = ? AND idx IN ({marks})"
                for idx, label, blob in conn.execute(query, (self.split, *chunk)):
                    rows[idx] = (label, blob)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: query failed ({err}): the database is corrupt. {_fix_hint(self.path)}") from err
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise ValueError(f"{self.path}: split {self.split!r} lacks rows {missing[:5]}: the database is incomplete. {_fix_hint(self.path)}")
        self.rows_read += len(wanted)
        if self.read_log is not None:
            self.read_log.extend(wanted)
        return rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, blob = self._fetch([index])[index]
        return self._decode(index, blob), label

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch in one query (used by DataLoader's automatic batching)."""
        rows = self._fetch(indices)
        return [(self._decode(i, rows[i][1]), rows[i][0]) for i in indices]

    @property
    def targets(self) -> torch.Tensor:
        """All labels of the split (one query on the index), for label-aware partitioners."""
        if self._targets is None:
            conn = self.connection()
            labels = [row[0] for row in conn.execute("SELECT label FROM samples WHERE split = ? ORDER BY idx", (self.split,))]
            self._targets = torch.tensor(labels, dtype=torch.long)
        return self._targets

    def all_inputs(self) -> torch.Tensor:
        """Every image of the split (for k-means partitioning)."""
        return torch.stack([x for x, _ in self.__getitems__(list(range(self.length)))])


class SQLiteDataModule(ImageDataModule):
    """Train / validation / test splits from an SQLite dataset written by ``distnn-to-sqlite``.

    Args:
        path: the database file.
        **kwargs: batch_size, num_workers (each worker opens its own connection), partition, ...
    """

    def __init__(self, path: str = "data/digits.sqlite", **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path

    def check(self) -> None:
        """The file exists and is a lightning_distnn SQLite dataset (schema and format)."""
        conn, _ = open_database(self.path)
        conn.close()

    def build_datasets(self):
        train, val, test = (SQLiteDataset(self.path, split) for split in SPLITS)
        self.image_shape = tuple(train.shape)
        self.num_classes = train.num_classes
        return train, val, test


# ---------------------------------------------------------------------------- writing
def _batches(data: Any, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], torch.as_tensor(y[start : start + batch_size])
        return
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        yield x, torch.as_tensor(y)


def write_sqlite(
    path: str | Path,
    splits: dict[str, Any],
    *,
    num_classes: int,
    source: str = "tensors",
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write ``{split: (x, y) tensors or a Dataset of (image, label)}`` to a new database at ``path``.

    The file is written under a temporary name and renamed at the end, so a crash never leaves a
    half-written dataset behind.
    """
    path = Path(path).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite (overwrite=True) to replace it, or choose another --out.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript(SCHEMA)
        counts: dict[str, int] = {}
        shape: Optional[tuple[int, ...]] = None
        for split, data in splits.items():
            n = 0
            for x, y in _batches(data):
                x = x.to(DTYPES[dtype]).contiguous()
                if shape is None:
                    shape = tuple(x.shape[1:])
                elif tuple(x.shape[1:]) != shape:
                    raise ValueError(f"split {split!r} has samples of shape {tuple(x.shape[1:])}, others {shape}: resize them first.")
                rows = [(split, n + i, int(label), x[i].numpy().tobytes()) for i, label in enumerate(y.tolist())]
                conn.executemany("INSERT INTO samples (split, idx, label, image) VALUES (?, ?, ?, ?)", rows)
                n += len(rows)
            counts[split] = n
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "shape": json.dumps(list(shape or ())),
            "dtype": dtype,
            "num_classes": str(int(num_classes)),
            "splits": json.dumps(counts),
            "source": source,
        }
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)
    return path


def _source_module(args: argparse.Namespace) -> ImageDataModule:
    if args.source == "digits":
        from lightning_distnn.data.digits import DigitsDataModule

        return DigitsDataModule(image_size=args.image_size)
    if args.source == "synthetic":
        from lightning_distnn.data.synthetic import SyntheticDataModule

        return SyntheticDataModule(num_samples=args.num_samples, image_shape=(3, args.image_size, args.image_size))
    if args.source == "cifar10":
        from lightning_distnn.data.cifar10 import CIFAR10DataModule

        return CIFAR10DataModule(data_dir=args.data_dir, augment=False, val_size=args.val_size)
    if args.source == "image_folder":
        from lightning_distnn.data.image_folder import ImageFolderDataModule

        return ImageFolderDataModule(root=args.root, image_size=args.image_size)
    raise ValueError(f"Unknown --source {args.source!r}; valid sources: {', '.join(SOURCES)}.")


def table_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], label: str, where: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Rows of a table -> ``(features (n, F) float32, labels (n,) long, class names)``.

    Every column but ``label`` is a feature and must hold numbers; the labels may be anything: their
    distinct values, sorted, become the classes ``0..C-1`` (integers keep their order).
    """
    columns = list(columns)
    if label not in columns:
        raise ValueError(f"{where} has no column {label!r} to use as the label; its columns are {', '.join(columns)}: "
                         "pass --label with one of them.")
    li = columns.index(label)
    features = [c for i, c in enumerate(columns) if i != li]
    if not features:
        raise ValueError(f"{where} has only the label column {label!r}: select the feature columns too.")
    x, y = [], []
    for n, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"{where}, row {n}: {len(row)} values for {len(columns)} columns ({', '.join(columns)}).")
        try:
            x.append([float(v) for i, v in enumerate(row) if i != li])
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(row) if i != li and not _is_number(v))
            raise ValueError(f"{where}, row {n}: column {columns[bad]!r} holds {row[bad]!r}, not a number. Select "
                             "only numeric feature columns (encode the others first).") from None
        y.append(row[li])
    if not x:
        raise ValueError(f"{where} returned no rows: there is nothing to convert.")
    classes = sorted(set(y), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0.0, str(v)))
    index = {v: i for i, v in enumerate(classes)}
    return torch.tensor(x, dtype=torch.float32), torch.tensor([index[v] for v in y]), [str(c) for c in classes]


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return value is not None
    except (TypeError, ValueError):
        return False


def _table_source(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if args.source == "query":
        if not args.db or not args.query:
            raise ValueError("--source query needs --db FILE and --query 'SELECT <feature columns>, <label> FROM ...'.")
        db = Path(args.db).expanduser()
        if not db.is_file():
            raise FileNotFoundError(f"--db {db} does not exist.")
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            cursor = conn.execute(args.query)
            columns = [d[0] for d in cursor.description]
            return table_rows(columns, cursor.fetchall(), args.label, f"--query on {db}")
        except sqlite3.Error as exc:
            raise ValueError(f"--query failed on {db}: {exc}. Check the SQL (sqlite3 {db} '.schema' shows the tables).") from exc
        finally:
            conn.close()
    import csv

    if not args.csv:
        raise ValueError("--source csv needs --csv FILE (a header row, then one sample per row).")
    path = Path(args.csv).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--csv {path} does not exist.")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"--csv {path} is empty.")
        return table_rows(header, list(reader), args.label, f"--csv {path}")


def convert(args: argparse.Namespace) -> Path:
    """Write the train/val/test splits of a supported dataset to an SQLite file."""
    if args.source in ("query", "csv"):
        x, y, classes = _table_source(args)
        train, val, test = split_indices(len(x), (args.val_fraction, args.test_fraction), seed=args.seed)
        splits = {name: (x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}
        return write_sqlite(args.out, splits, num_classes=len(classes), source=f"{args.source}: {', '.join(classes)}",
                            dtype=args.dtype, overwrite=args.overwrite)
    dm = _source_module(args)
    dm.setup()
    splits = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
    return write_sqlite(args.out, splits, num_classes=dm.num_classes, source=args.source, dtype=args.dtype, overwrite=args.overwrite)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnn-to-sqlite", description="Convert a dataset into a lightning_distnn SQLite file.")
    p.add_argument("--source", choices=SOURCES, default="digits", help="dataset to convert")
    p.add_argument("--out", required=True, help="the .sqlite file to write")
    p.add_argument("--image-size", type=int, default=32, help="side of the images (digits, synthetic, image_folder)")
    p.add_argument("--data-dir", default="data", help="cifar10: folder holding cifar-10-batches-py")
    p.add_argument("--val-size", type=int, default=5000, help="cifar10: training images held out for validation")
    p.add_argument("--root", default="data/images", help="image_folder: folder with one sub-folder per class")
    p.add_argument("--num-samples", type=int, default=2048, help="synthetic: training samples")
    p.add_argument("--db", help="query: the SQLite file to read (opened read-only)")
    p.add_argument("--query", help="query: SQL whose columns are the features and the label, e.g. "
                   "'SELECT age, income, churned FROM customers'")
    p.add_argument("--csv", help="csv: the file to read (a header row, then one sample per row)")
    p.add_argument("--label", default="label", help="query, csv: the label column (its distinct values are the classes)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="query, csv: rows held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.1, help="query, csv: rows held out for testing")
    p.add_argument("--seed", type=int, default=0, help="query, csv: seed of the split")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage type of the images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``distnn-to-sqlite [convert] --source S --out F`` or ``... info F``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        if len(argv) != 2:
            print("usage: distnn-to-sqlite info FILE", file=sys.stderr)
            return 2
        conn, info = open_database(argv[1])
        conn.close()
        print(json.dumps(info, indent=2))
        return 0
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    try:
        out = convert(args)
    except (OSError, ValueError) as exc:  # bad input: one line that says what to pass
        print(f"distnn-to-sqlite: {exc}", file=sys.stderr)
        return 2
    conn, info = open_database(out)
    conn.close()
    print(f"wrote {out}: {json.dumps(info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
