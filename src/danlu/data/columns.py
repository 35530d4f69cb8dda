"""The data files a config names (data.train, validation, test), checked from their first rows before torch
loads: a file with no data rows, a repeated column name, and a mistyped column name (data.target, features,
text, image), after a mistyped path the commonest mistakes, come back in well under a second (the nearest
column named), not after torch's import and the data load (or once per process under torchrun). Only the
head is read: a CSV's first rows (the csv module; pandas confirms a name it seems to lack, so its reading of
the header decides), a Parquet file's schema and row count. Other sources (NPY, NPZ, JSON Lines, folders,
synthetic data) are left to the family's own checks, as is any file this cannot read: the data load reports
those with the whole file at hand."""

from __future__ import annotations

import csv
import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.config import DataConfig

CSV, PARQUET = (".csv",), (".parquet", ".pq")


def missing_columns_error(
    missing: list[str], available: list[str], what: str, where: str = "the data"
) -> DanluError:
    """One line naming the missing columns, the nearest available name of each, and the columns."""
    hints = [difflib.get_close_matches(name, available, n=1) for name in missing]
    close = [f"'{m[0]}'" for m in hints if m]
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    return DanluError(
        f"{what} {', '.join(repr(m) for m in missing)} not in {where}",
        f"{suggestion}available columns: {shown}",
    )


def empty_csv_error(path: Path | str) -> DanluError:
    """A CSV file of no bytes or blank lines only: no header, no rows."""
    return DanluError(f"'{path}' is empty", "pass a CSV with a header row and data rows")


def check_separator(path: Path | str, names: list[str]) -> None:
    """A CSV header read as one column that holds another separator (';', a tab, '|'): the file is not
    comma-separated, and every column danlu looks for would be missing from it.

    Raises:
        DanluError: naming the separator.
    """
    if len(names) != 1:
        return
    for separator, called in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")):
        if len(names[0].split(separator)) > 1:
            raise DanluError(
                f"'{path}' is separated by {called}, not commas (its header reads as one column "
                f"{names[0]!r})",
                "save it as comma-separated CSV",
            )


def unique_columns(names: list[str], path: Path | str) -> list[str]:
    """The names, where no two are the same: a file with two columns of one name is refused (pandas would
    rename the second 'a' to 'a.1', and a model would train on, or be given, a column nobody named).

    Raises:
        DanluError: a name is repeated.
    """
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if name in seen and name:  # unnamed columns are each given their own name ('Unnamed: 3')
            raise DanluError(
                f"'{path}' has two columns named '{name}' (columns {seen[name]} and {number})",
                "rename or remove one of them",
            )
        seen[name] = number
    return names


def no_rows_error(name: Path | str) -> DanluError:
    """A data file with a header and no rows."""
    return DanluError(f"'{name}' has no data rows", "pass a file with at least a few rows")


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
    """The column names of a CSV or Parquet file as the data load will see them; None for other sources,
    for an empty CSV and for files whose header cannot be read here."""
    head = _head(path)
    return None if head is None or _is_empty_csv(path, head) else head[0]


def _head(path: Path) -> tuple[list[str], bool] | None:
    """(the column names, whether a data row follows them) of a CSV or Parquet file, ([], False) for a
    CSV that is empty (no bytes, or blank lines only, as pandas reads it); None as in header."""
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in CSV + PARQUET:
        return None
    try:
        if suffix in PARQUET:
            import pyarrow.parquet as pq

            metadata = pq.read_metadata(path)
            return [str(name) for name in metadata.schema.to_arrow_schema().names], metadata.num_rows > 0
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = (row for row in csv.reader(f) if row)  # pandas skips blank lines
            names, following = next(rows, None), next(rows, None)
            if names is None or (following is None and not "".join(names).strip()):
                return [], False
            return names, following is not None
    except (OSError, ValueError, csv.Error, ImportError):  # the data load says why, with the whole file
        return None


def _is_empty_csv(path: Path, head: tuple[list[str], bool]) -> bool:
    return not head[0] and path.suffix.lower() in CSV


def _pandas_header(path: Path) -> list[str] | None:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (OSError, ValueError):  # as in header
        return None


def check_data_files(data: DataConfig) -> None:
    """Every CSV or Parquet file data.train, validation and test name has data rows and every column the
    config names (see the module's docstring)."""
    from danlu.config import data_files  # config imports this module only when it checks

    named = named_columns(data)
    for key, spec in data_files(data).items():
        path = Path(spec)
        head = _head(path)
        if head is None:
            continue
        if _is_empty_csv(path, head):
            raise empty_csv_error(path)
        columns, has_rows = head
        if path.suffix.lower() in CSV:
            check_separator(path, columns)
        unique_columns(columns, path)
        where = "the data" if key == "train" else f"data.{key} '{spec}'"
        for what, names in named:
            _check_columns(path, columns, names, what, where)
        if not has_rows:
            raise no_rows_error(path)


def _check_columns(path: Path, columns: list[str], names: list[str], what: str, where: str) -> None:
    missing = [name for name in names if name not in columns]
    if missing and path.suffix.lower() in CSV:
        # the csv module's header is pandas' but for quoting corner cases: pandas decides before anything
        # is refused (repeated names, which pandas would rename, were refused before this)
        columns = _pandas_header(path) or []
        missing = [name for name in names if name not in columns] if columns else []
    if missing:
        raise missing_columns_error(missing, columns, what + ("s" if len(missing) > 1 else ""), where)
