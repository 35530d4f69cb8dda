"""Data sources: CSV, Parquet, NPZ, NPY and synthetic generators, read whole or in row chunks.

Parquet may also come in shards (as the Hugging Face hub and Spark write datasets): a pattern
(data/train-*.parquet) or a folder of Parquet files is one table, its files in name order.

Every source is a `Table`: column names, an in-memory size estimate, and `read_chunk(i)` for a fixed
split into chunks (so a shuffled chunk order can be replayed exactly on resume). NPY files are opened
with memory mapping; each chunk maps the file only while it is copied out, so reading a file far
larger than RAM keeps the resident set small.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from danlu.config import SYNTHETIC_PREFIX, SyntheticConfig, existing_data, is_pattern
from danlu.data.columns import check_separator, empty_csv_error, unique_columns
from danlu.data.dataset import Fingerprinted
from danlu.errors import DanluError, not_utf8

# what np.load raises for a file that is not what its name says: pickled data, a zip or NPY cut short, none
NUMPY_FILE_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)
PARQUET = (".parquet", ".pq")
SUFFIXES = (".csv", *PARQUET, ".npz", ".npy", ".jsonl")
# a shard's name as the Hugging Face hub writes it: SPLIT-00000-of-00004.parquet
SHARD_NAME = re.compile(r"(.+)-\d+-of-\d+$")
WHOLE_HASH_BYTES = 1 << 30  # files up to this size are hashed whole; larger ones by samples
SAMPLE_BYTES = 1 << 20
SAMPLES = 64


def parquet_shards(path: Path) -> list[Path] | None:
    """The Parquet files a pattern matches or a folder holds, in name order; None for a path that is
    neither. A folder of several splits' shards (train-00000-of-00002.parquet beside test-...) is refused:
    it is not one table.

    Raises:
        DanluError: no Parquet file in the folder, or shards of several splits."""
    if is_pattern(path):
        return sorted(p for p in path.parent.glob(path.name) if p.is_file())
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PARQUET)
    if not files:
        raise DanluError(
            f"'{path}' is a folder with no Parquet file", "name a data file, or a folder of Parquet shards"
        )
    splits = sorted({m.group(1) for p in files if (m := SHARD_NAME.match(p.stem))})
    if len(splits) > 1:
        example = path / f"{splits[0]}-*{files[0].suffix}"
        raise DanluError(
            f"'{path}' holds the shards of {len(splits)} splits ({', '.join(splits)})",
            f"name one split's shards with a pattern, e.g. data.train={example}",
        )
    return files


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size and SHA-256 of a data file: the whole file up to 1 GiB; past that, its first and last 16 MiB
    and 64 evenly spaced 1 MiB blocks (an edit elsewhere in a file that keeps its size goes unseen).
    Parquet shards (a pattern or a folder): their files' fingerprints, one after the other."""
    shards = parquet_shards(Path(path))
    if shards is not None:
        return {"files": [{"name": p.name, **file_fingerprint(p)} for p in shards]}
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: f.read(SAMPLE_BYTES * 8), b""):
                digest.update(block)
        else:
            edge = 16 * SAMPLE_BYTES
            spread = (int(i * (size - SAMPLE_BYTES) / (SAMPLES - 1)) for i in range(SAMPLES))
            starts = [0, *spread, size - edge]
            for start in starts:
                f.seek(start)
                digest.update(f.read(edge if start in (0, size - edge) else SAMPLE_BYTES))
    return {"bytes": size, "sha256": digest.hexdigest(), "sampled": size > WHOLE_HASH_BYTES}


def frame_fingerprint(frame: pd.DataFrame) -> dict:
    """Rows and a hash of a generated frame's values and column names (synthetic data has no file)."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    digest.update("\0".join(map(str, frame.columns)).encode())
    return {"rows": len(frame), "sha256": digest.hexdigest()}


class FrameTable(Fingerprinted):
    """A table already in memory (CSV, NPZ, synthetic data)."""

    def __init__(self, frame: pd.DataFrame, name: str, chunk_rows: int = 262_144, path: Path | None = None):
        self.frame = frame
        self.name = name
        self.chunk_rows = chunk_rows
        self.path = path  # the file it was read from; None for generated data

    def fingerprint(self) -> dict:
        return file_fingerprint(self.path) if self.path is not None else frame_fingerprint(self.frame)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    @property
    def nbytes(self) -> int:
        return int(self.frame.memory_usage(deep=False).sum())

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.n_rows / self.chunk_rows))

    def read_chunk(self, index: int) -> pd.DataFrame:
        return self.frame.iloc[index * self.chunk_rows : (index + 1) * self.chunk_rows]

    def read_all(self) -> pd.DataFrame:
        return self.frame


class NpyTable(Fingerprinted):
    """A 2-D numeric .npy file; columns are named x0..x{n-1}."""

    def __init__(self, path: Path, chunk_rows: int = 262_144):
        self.path = path
        self.name = str(path)
        self.chunk_rows = chunk_rows
        array = self._map()
        if array.ndim != 2 or array.dtype.kind not in "fiub":
            raise DanluError(
                f"'{path}' holds a {array.ndim}-D {array.dtype} array; danlu reads 2-D numeric NPY files",
                "save features and target as columns of one 2-D array, or use NPZ/Parquet/CSV",
            )
        self.n_rows, n_cols = array.shape
        self.dtype = array.dtype
        self.columns = [f"x{j}" for j in range(n_cols)]
        del array

    def _map(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except NUMPY_FILE_ERRORS as exc:
            raise DanluError(f"cannot read '{self.path}' as NPY: {exc}", "check the file") from None

    def fingerprint(self) -> dict:
        return file_fingerprint(self.path)

    @property
    def nbytes(self) -> int:
        return self.n_rows * len(self.columns) * self.dtype.itemsize

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.n_rows / self.chunk_rows))

    def read_chunk(self, index: int) -> pd.DataFrame:
        start = index * self.chunk_rows
        array = self._map()  # a fresh mapping per chunk: dropping it releases the pages from our RSS
        block = np.array(array[start : start + self.chunk_rows])
        del array
        return pd.DataFrame(block, columns=self.columns, index=pd.RangeIndex(start, start + len(block)))

    def read_all(self) -> pd.DataFrame:
        return pd.DataFrame(np.array(self._map()), columns=self.columns)


class ParquetTable(Fingerprinted):
    """A Parquet file, or shards of one table (a pattern or a folder, parquet_shards); chunks are the row
    groups of its files, in order."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        self.name = str(path)
        shards = parquet_shards(path) or [path]
        self.files = []
        for shard in shards:
            try:
                self.files.append(pq.ParquetFile(shard))
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise DanluError(f"cannot read '{shard}' as Parquet: {exc}", "check the file") from None
        self.columns = unique_columns([str(c) for c in self.files[0].schema_arrow.names], shards[0])
        for shard, file in zip(shards[1:], self.files[1:], strict=True):
            other = [str(c) for c in file.schema_arrow.names]
            if other != self.columns:
                raise DanluError(
                    f"'{shard}' has the columns {other}, and '{shards[0]}' has {self.columns}",
                    "give every shard of a table the same columns, in the same order",
                )
        self._groups = [
            (f, g) for f, file in enumerate(self.files) for g in range(file.metadata.num_row_groups)
        ]
        sizes = [self.files[f].metadata.row_group(g).num_rows for f, g in self._groups]
        self._starts = np.cumsum([0, *sizes])
        self.n_rows = int(self._starts[-1])

    def fingerprint(self) -> dict:
        return file_fingerprint(self.path)

    @property
    def nbytes(self) -> int:
        return sum(self.files[f].metadata.row_group(g).total_byte_size for f, g in self._groups)

    @property
    def n_chunks(self) -> int:
        return max(1, len(self._groups))

    def read_chunk(self, index: int) -> pd.DataFrame:
        if not self._groups:
            return pd.DataFrame(columns=self.columns)
        f, g = self._groups[index]
        frame = self.files[f].read_row_group(g).to_pandas()
        start = int(self._starts[index])
        frame.index = pd.RangeIndex(start, start + len(frame))
        return frame

    def read_all(self) -> pd.DataFrame:
        frames = [file.read().to_pandas() for file in self.files]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


Table = FrameTable | NpyTable | ParquetTable


def synthetic_frame(kind: str, params: SyntheticConfig) -> pd.DataFrame:
    """Generate the sklearn make_classification / make_regression workload as a frame."""
    from sklearn.datasets import make_classification, make_regression

    if kind == "classification":
        x, y = make_classification(
            n_samples=params.n_samples,
            n_features=params.n_features,
            n_informative=params.n_informative,
            n_redundant=params.n_redundant,
            n_classes=params.n_classes,
            n_clusters_per_class=params.n_clusters_per_class,
            flip_y=params.flip_y,
            class_sep=params.class_sep,
            random_state=params.random_state,
        )
        target = "label"
    else:
        x, y = make_regression(
            n_samples=params.n_samples,
            n_features=params.n_features,
            n_informative=min(params.n_informative, params.n_features),
            noise=params.noise,
            random_state=params.random_state,
        )
        target = "target"
    frame = pd.DataFrame(x.astype(np.float32), columns=[f"x{j}" for j in range(x.shape[1])])
    frame[target] = y
    return frame


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    with _csv_errors(path):
        # the header as written (header=None: pandas does not rename repeated names in a data row)
        written = [
            str(c) for c in pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
        ]
        check_separator(path, written)
        unique_columns(written, path)
        return pd.read_csv(path, **kwargs)


def _csv_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    """The CSV's rows, `rows` at a time; a problem found further in is the same one line as at the start."""
    with _csv_errors(path):
        yield from _read_csv(path, chunksize=rows)


@contextlib.contextmanager
def _csv_errors(path: Path) -> Iterator[None]:
    """pandas' errors reading a CSV as one line each."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise empty_csv_error(path) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "save it as UTF-8 CSV (Excel: 'CSV UTF-8')") from None
    except pd.errors.ParserError as exc:
        raise DanluError(f"cannot parse '{path}' as CSV: {exc}".splitlines()[0], "check the file") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON Lines: one object per line, its keys the columns."""
    try:
        return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")  # a BOM is skipped
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "save it as UTF-8") from None
    except ValueError as exc:
        raise DanluError(
            f"cannot parse '{path}' as JSON Lines: {exc}".splitlines()[0], "write one JSON object per line"
        ) from None


def _read_npz(path: Path) -> pd.DataFrame:
    try:
        archive = np.load(path, allow_pickle=False)
    except NUMPY_FILE_ERRORS as exc:
        raise DanluError(f"cannot read '{path}' as NPZ: {exc}", "check the file") from None
    columns: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                array = archive[key]
            except NUMPY_FILE_ERRORS as exc:  # a pickled member; a damaged file
                raise DanluError(
                    f"cannot read member '{key}' of '{path}': {exc}",
                    "store plain arrays (numbers or strings, not Python objects)",
                ) from None
            if array.ndim == 1:
                columns[key] = array
            elif array.ndim == 2:
                # A 2-D member X becomes columns x0..x{n-1}, matching NPY and synthetic data.
                columns.update({f"{key.lower()}{j}": array[:, j] for j in range(array.shape[1])})
            else:
                raise DanluError(f"'{path}' member '{key}' is {array.ndim}-D", "store 1-D or 2-D arrays")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise DanluError(f"'{path}' members have different lengths {sorted(lengths)}", "align them")
    return pd.DataFrame(columns)


def check_path(spec: str) -> Path:
    path = existing_data(spec)
    if is_pattern(path) and path.suffix.lower() not in PARQUET:
        raise DanluError(
            f"'{spec}' is a pattern of {path.suffix or 'other'} files; a pattern names Parquet shards",
            "name one file, or Parquet shards (data/train-*.parquet)",
        )
    if path.is_dir() and parquet_shards(path):
        return path
    if path.suffix.lower() not in SUFFIXES:
        raise DanluError(
            f"'{spec}' has an unsupported type '{path.suffix}'", f"use one of {', '.join(SUFFIXES)}"
        )
    return path


def open_table(spec: str, synthetic: SyntheticConfig | None = None, chunk_rows: int = 262_144) -> Table:
    """Open a data source by its config string (a path or synthetic:KIND)."""
    if spec.startswith(SYNTHETIC_PREFIX):
        kind = spec[len(SYNTHETIC_PREFIX) :]
        return FrameTable(synthetic_frame(kind, synthetic or SyntheticConfig()), spec, chunk_rows)
    path = check_path(spec)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpyTable(path, chunk_rows)
    if suffix in PARQUET or path.is_dir():
        return ParquetTable(path)
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl}
    frame = readers.get(suffix, _read_npz)(path)
    return FrameTable(frame, str(path), chunk_rows, path)


def stream_frames(spec: str, chunk_rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """Yield a file's rows in order, a chunk at a time (CSV is parsed incrementally)."""
    path = check_path(spec)
    if path.suffix.lower() == ".csv":
        if os.path.getsize(path) == 0:
            raise empty_csv_error(path)
        yield from _csv_chunks(path, chunk_rows)
        return
    table = open_table(spec, chunk_rows=chunk_rows)
    for index in range(table.n_chunks):
        yield table.read_chunk(index)
