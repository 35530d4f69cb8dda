"""The held-out rows of a run, recorded in its run directory, so evaluate, quickstart's predictions and
export verification never reach back into data files that may have moved or changed.

heldout.json says which split the run reports on and how to get its rows back:
  stored:  the rows themselves (heldout.parquet for tables and texts, heldout.npz for images) when they
           take at most MAX_STORED_BYTES in memory;
  indices: their row numbers in the training file (heldout.npy), checked against its fingerprint;
  chunks:  chunked runs: the seeded per-row split of every chunk, checked against the fingerprint;
  file:    a separate test/validation file, checked against its fingerprint.
It also holds the training source's fingerprint, which `--resume` checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from danlu.data.dataset import HeldOut, Source
from danlu.errors import DanluError
from danlu.run import HELDOUT_INDEX, RunDir, atomic_write, atomic_write_json, read_json

if TYPE_CHECKING:
    from danlu.families.contract import Family

FORMAT_VERSION = 1
MAX_STORED_BYTES = 64 * 2**20


def write(run: RunDir, family: Family, held_out: HeldOut, train: Source) -> dict[str, Any]:
    """Record the held-out rows and the sources' fingerprints in the run directory; returns heldout.json."""
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "split": held_out.split,
        "source": held_out.source.name,
        "fingerprints": {train.name: train.fingerprint()},
    }
    if held_out.source is not train:
        record["fingerprints"][held_out.source.name] = held_out.source.fingerprint()
    items = held_out.items
    data = None
    if items is not None and family.nbytes(items) <= MAX_STORED_BYTES:
        data = family.store_rows(items)
    if data is not None:
        atomic_write(run.path / family.stored_rows, lambda f: f.write(data))
        record.update(kind="stored", file=family.stored_rows, rows=family.count(items))
    elif held_out.indices is not None:
        atomic_write(run.path / HELDOUT_INDEX, lambda f: np.save(f, held_out.indices.astype(np.int64)))
        record.update(kind="indices", rows=len(held_out.indices))
    elif held_out.plan is not None:
        record.update(kind="chunks", plan=held_out.plan)
    else:
        record.update(kind="file")
    atomic_write_json(run.heldout, record)
    return record


def read_record(run: RunDir) -> dict[str, Any]:
    if not run.heldout.is_file():
        raise DanluError(
            f"run '{run.path}' has no {run.heldout.name} (it was trained by an older danlu)",
            f"pass a labelled file: `danlu evaluate {run.path} DATA`, or train the run again",
        )
    record = read_json(run.heldout)
    if record.get("format") != FORMAT_VERSION:
        raise DanluError(
            f"{run.heldout} has format {record.get('format')}, this danlu reads {FORMAT_VERSION}",
            "use the danlu version that wrote the run",
        )
    return record


def check_source(run: RunDir, family: Family, spec: str, source: Source | None = None) -> Source:
    """Open SPEC (or take its open source) and raise unless it is the data the run recorded."""
    record = read_record(run)
    expected = record["fingerprints"].get(spec)
    if expected is None:
        raise DanluError(f"run '{run.path}' has no fingerprint of '{spec}'", "train the run again")
    if source is None:
        if not spec.startswith("synthetic:") and not Path(spec).exists():
            raise DanluError(
                f"run '{run.path}' reads its held-out rows from '{spec}', which is no longer there",
                f"put the file back, or pass a labelled file: `danlu evaluate {run.path} DATA`",
            )
        from danlu.config import read_yaml, validate

        data = validate(read_yaml(run.config)).data
        source = family.reopen(spec, data, record.get("plan", {}).get("chunk_rows", data.chunk_rows))
    _same(run, spec, source.matches(expected))
    return source


def _same(run: RunDir, spec: str, same: bool) -> None:
    if not same:
        raise DanluError(
            f"'{spec}' has changed since run '{run.path}' was trained (its fingerprint differs)",
            "restore the original file, or pass data explicitly, e.g. `danlu evaluate RUN DATA`",
        )


def _check_file(run: RunDir, family: Family, spec: str, record: dict[str, Any]) -> None:
    """check_source for a held-out file that is read again a chunk at a time: where the family can tell a
    file's fingerprint without reading its rows (tables and texts), the rows are not loaded just to be
    fingerprinted, which would hold the whole file in memory and parse it twice."""
    of_file = family.file_fingerprint
    expected = record["fingerprints"].get(spec)
    if of_file is None or expected is None or not Path(spec).is_file():
        check_source(run, family, spec)  # its errors: no fingerprint recorded, the file is gone
        return
    _same(run, spec, of_file(spec) == expected)


def items(run: RunDir, family: Family, state: Any) -> tuple[str, Iterator[Any]]:
    """The run's held-out split name and its rows (the family's items), exactly as at the end of training.

    The split is "none" when the run held no rows out; its rows are then a sample of training rows."""
    record = read_record(run)
    kind, split = record["kind"], record["split"]
    if kind == "stored":
        return split, family.read_stored(run.path / record.get("file", family.stored_rows))
    if kind == "file":
        _check_file(run, family, record["source"], record)
        return split, family.read(record["source"], state)
    source = check_source(run, family, record["source"])
    if kind == "indices":
        index = np.load(run.path / HELDOUT_INDEX, allow_pickle=False)
        return split, iter([family.select(source, index, state)])
    if family.plan_frames is None:
        raise DanluError(f"{run.heldout} records chunks, which {family.name} runs never do", "train again")
    return split, family.plan_frames(source, record["plan"])  # chunks
