"""The held-out rows of a run, recorded in its run directory, so evaluate, quickstart's predictions and
export verification never reach back into data files that may have moved or changed.

heldout.json says which split the run reports on and how to get its rows back:
  stored:  the rows themselves in heldout.parquet (when they take at most MAX_STORED_BYTES in memory);
  indices: their row numbers in the training file (heldout.npy), checked against its fingerprint;
  chunks:  chunked runs: the seeded per-row split of every chunk, checked against the fingerprint;
  file:    a separate test/validation file, checked against its fingerprint.
It also holds the training source's fingerprint, which `--resume` checks.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from danlu.config import DataConfig
from danlu.data.batches import split_mask
from danlu.data.dataset import HeldOut
from danlu.data.sources import Table, open_table, stream_frames
from danlu.errors import DanluError
from danlu.run import HELDOUT_INDEX, HELDOUT_ROWS, RunDir, atomic_write, atomic_write_json

log = logging.getLogger("danlu")

FORMAT_VERSION = 1
MAX_STORED_BYTES = 64 * 2**20
READ_ROWS = 100_000  # rows per frame when reading stored rows back


def _parquet_bytes(frame: pd.DataFrame) -> bytes | None:
    """The frame as Parquet, or None when a column holds values Parquet cannot type (mixed objects)."""
    import pyarrow as pa

    buffer = io.BytesIO()
    try:
        frame.reset_index(drop=True).to_parquet(buffer, index=False)
    except (pa.ArrowException, TypeError, ValueError) as error:
        log.debug("held-out rows not stored as Parquet: %s", error)
        return None
    return buffer.getvalue()


def write(run: RunDir, held_out: HeldOut, train: Table) -> dict[str, Any]:
    """Record the held-out rows and the sources' fingerprints in the run directory; returns heldout.json."""
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "split": held_out.split,
        "source": held_out.table.name,
        "fingerprints": {train.name: train.fingerprint()},
    }
    if held_out.table is not train:
        record["fingerprints"][held_out.table.name] = held_out.table.fingerprint()
    frame = held_out.frame
    data = None
    if frame is not None and int(frame.memory_usage(deep=True).sum()) <= MAX_STORED_BYTES:
        data = _parquet_bytes(frame)
    if data is not None:
        atomic_write(run.path / HELDOUT_ROWS, lambda f: f.write(data))
        record.update(kind="stored", rows=len(frame))
    elif held_out.indices is not None:
        atomic_write(run.path / HELDOUT_INDEX, lambda f: np.save(f, held_out.indices.astype(np.int64)))
        record.update(kind="indices", rows=len(held_out.indices))
    elif held_out.plan is not None:
        record.update(kind="chunks", plan=held_out.plan)
    else:
        record.update(kind="file", rows=held_out.table.n_rows)
    atomic_write_json(run.heldout, record)
    return record


def read_record(run: RunDir) -> dict[str, Any]:
    if not run.heldout.is_file():
        raise DanluError(
            f"run '{run.path}' has no {run.heldout.name} (it was trained by an older danlu)",
            f"pass a labelled file: `danlu evaluate {run.path} DATA`, or train the run again",
        )
    record = json.loads(run.heldout.read_text())
    if record.get("format") != FORMAT_VERSION:
        raise DanluError(
            f"{run.heldout} has format {record.get('format')}, this danlu reads {FORMAT_VERSION}",
            "use the danlu version that wrote the run",
        )
    return record


def check_source(run: RunDir, spec: str, table: Table | None = None) -> Table:
    """Open SPEC (or take its open table) and raise unless it is the data the run recorded."""
    record = read_record(run)
    expected = record["fingerprints"].get(spec)
    if expected is None:
        raise DanluError(f"run '{run.path}' has no fingerprint of '{spec}'", "train the run again")
    if table is None:
        if not spec.startswith("synthetic:") and not Path(spec).is_file():
            raise DanluError(
                f"run '{run.path}' reads its held-out rows from '{spec}', which is no longer there",
                f"put the file back, or pass a labelled file: `danlu evaluate {run.path} DATA`",
            )
        from danlu.config import read_yaml, validate

        data: DataConfig = validate(read_yaml(run.config)).data
        table = open_table(spec, data.synthetic, record.get("plan", {}).get("chunk_rows", data.chunk_rows))
    if table.fingerprint() != expected:
        raise DanluError(
            f"'{spec}' has changed since run '{run.path}' was trained (its fingerprint differs)",
            "restore the original file, or pass data explicitly, e.g. `danlu evaluate RUN DATA`",
        )
    return table


def frames(run: RunDir) -> tuple[str, Iterator[pd.DataFrame]]:
    """The run's held-out split name and its rows, a frame at a time, exactly as at the end of training.

    The split is "none" when the run held no rows out; its rows are then a sample of training rows."""
    record = read_record(run)
    kind, split = record["kind"], record["split"]
    if kind == "stored":
        return split, _stored_frames(run.path / HELDOUT_ROWS)
    table = check_source(run, record["source"])
    if kind == "indices":
        index = np.load(run.path / HELDOUT_INDEX, allow_pickle=False)
        return split, iter([table.read_all().iloc[index]])
    if kind == "chunks":
        return split, _chunk_frames(table, record["plan"])
    return split, stream_frames(record["source"], READ_ROWS)


def _stored_frames(path: Path) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
        yield batch.to_pandas()


def _chunk_frames(table: Table, plan: dict[str, Any]) -> Iterator[pd.DataFrame]:
    for chunk in range(table.n_chunks):
        frame = table.read_chunk(chunk)
        mask = split_mask(plan["seed"], chunk, len(frame), plan["val_fraction"], plan["test_fraction"])
        yield frame[mask == plan["part"]]
