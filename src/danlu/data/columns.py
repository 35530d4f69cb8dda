"""The columns a config names (data.target, data.features, data.text, data.image), checked against the
training file's header before torch loads: a mistyped column name, after a mistyped path the commonest
mistake, comes back in well under a second with the nearest column, not after torch's import and the
data load (or once per process under torchrun). Only the header is read: a CSV's first row (the csv
module; pandas confirms a name it seems to lack, so its reading of the header decides), a Parquet
file's schema. Other sources (NPY, NPZ, JSON Lines, folders, synthetic data) are left to the family's
own checks, as is any file this cannot read: the data load reports those with the whole file at hand."""

from __future__ import annotations

import csv
import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.config import DataConfig

CSV, PARQUET = (".csv",), (".parquet", ".pq")


def missing_columns_error(missing: list[str], available: list[str], what: str) -> DanluError:
    """One line naming the missing columns, the nearest available name of each, and the columns."""
    hints = [difflib.get_close_matches(name, available, n=1) for name in missing]
    close = [f"'{m[0]}'" for m in hints if m]
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    return DanluError(
        f"{what} {', '.join(repr(m) for m in missing)} not in the data",
        f"{suggestion}available columns: {shown}",
    )


def named_columns(data: DataConfig) -> list[tuple[str, list[str]]]:
    """(what, names) for every column the config names in the training data, in the order checked."""
    from danlu.families import NO_TARGET  # the registry's names: no family is imported

    named = []
    if data.target is not None and data.family not in NO_TARGET:
        named.append(("target column", [data.target]))
    if data.features:
        named.append(("feature column", list(data.features)))
    for what, name in (("text column", data.text), ("image column", data.image)):
        if name is not None:
            named.append((what, [name]))
    return named


def header(path: Path) -> list[str] | None:
    """The column names of a CSV or Parquet file as the data load will see them; None for other sources
    and for files whose header cannot be read here."""
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in CSV + PARQUET:
        return None
    try:
        if suffix in PARQUET:
            import pyarrow.parquet as pq

            return [str(name) for name in pq.read_schema(path).names]
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), None)
    except (OSError, ValueError, csv.Error, ImportError):  # the data load says why, with the whole file
        return None


def _pandas_header(path: Path) -> list[str] | None:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (OSError, ValueError):  # as in header
        return None


def check_named_columns(data: DataConfig) -> None:
    """Every column the config names is in the training file's header (see the module's docstring)."""
    named = named_columns(data)
    if not named:
        return
    path = Path(data.train)
    columns = header(path)
    if columns is None:
        return
    for what, names in named:
        missing = [name for name in names if name not in columns]
        if missing and path.suffix.lower() in CSV:
            # the csv module's header is pandas' but for duplicate names (pandas renames the second 'a'
            # to 'a.1') and quoting corner cases: pandas decides before anything is refused
            columns = _pandas_header(path)
            if columns is None:
                return
            missing = [name for name in names if name not in columns]
        if missing:
            raise missing_columns_error(missing, columns, what + ("s" if len(missing) > 1 else ""))
