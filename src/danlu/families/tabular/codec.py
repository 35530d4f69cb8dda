"""Tabular items (a DataFrame, or the server's list of validated records) to model inputs, targets and
prediction files; and held-out rows stored as Parquet."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.data.sources import check_path, open_table, stream_frames
from danlu.data.sources import file_fingerprint as fingerprint_of
from danlu.errors import DanluError
from danlu.families.tabular.data import model_inputs
from danlu.families.tabular.preprocess import Preprocessor

log = logging.getLogger("danlu")
READ_ROWS = 100_000


def raw(pre: Preprocessor, items: pd.DataFrame | list[dict[str, Any]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Numeric features as float64 with NaN for missing, and categorical ones as stripped strings."""
    if isinstance(items, pd.DataFrame):
        return pre.raw_inputs(items, np.float64)
    return pre.raw_records(items)  # the server's path: no pandas per request


def inputs(pre: Preprocessor, items) -> dict[str, torch.Tensor]:
    return model_inputs(pre, *pre.transform_raw(*raw(pre, items)))


def feeds(pre: Preprocessor, items) -> dict[str, np.ndarray]:
    """The exported graph's inputs: raw numbers as float32 (NaN for missing) and one string array per
    categorical feature, named after it."""
    numeric, categorical = raw(pre, items)
    return {
        "numeric": numeric.astype(np.float32),
        **{c.name: v for c, v in zip(pre.categorical, categorical, strict=True)},
    }


def targets(pre: Preprocessor, items: pd.DataFrame) -> np.ndarray:
    if pre.target not in items.columns:
        raise DanluError(
            f"the data has no target column '{pre.target}'",
            "evaluation needs true values; use `danlu predict` for unlabeled data",
        )
    return pre.decode_target(pre.encode_target(items[pre.target]))


def count(items) -> int:
    return len(items)


def nbytes(items: pd.DataFrame) -> int:
    return int(items.memory_usage(deep=True).sum())


def as_items(pre: Preprocessor, data: Any) -> pd.DataFrame:
    """A DataFrame, a dict of columns, or a 2-D array (or one row) in feature order."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        return pd.DataFrame(data)
    array = np.asarray(data)
    if array.ndim == 1:
        array = array[None, :]
    return pd.DataFrame(array, columns=pre.features)


def read(spec: str, pre: Preprocessor, chunk_rows: int = READ_ROWS) -> Iterator[pd.DataFrame]:
    """A CSV/Parquet/NPZ/NPY file's rows in order, a chunk at a time. A file that already has columns of
    the names its predictions take (a file of earlier predictions) is named in one warning: the output
    holds this run's in their place (output_frame)."""
    for number, frame in enumerate(stream_frames(spec, chunk_rows)):
        replaced = [name for name in pre.prediction_names() if name in frame.columns] if number == 0 else []
        if replaced:
            log.warning(
                "'%s' already has %s: replaced in the output by this run's predictions (rename them to "
                "keep them)",
                spec,
                ", ".join(f"'{name}'" for name in replaced),
            )
        yield frame


def output_frame(pre: Preprocessor, items: pd.DataFrame, decoded: np.ndarray) -> pd.DataFrame:
    """The input rows in order with `prediction` (and `proba_<class>` columns) added, in place of any
    input column of those names (read warns of those)."""
    out = items.copy()
    for name, values in pre.prediction_columns(decoded).items():
        out[name] = values
    return out


def store_rows(items: pd.DataFrame) -> bytes | None:
    """The rows as Parquet, or None when a column holds values Parquet cannot type (mixed objects)."""
    import pyarrow as pa

    buffer = io.BytesIO()
    try:
        items.reset_index(drop=True).to_parquet(buffer, index=False)
    except (pa.ArrowException, TypeError, ValueError) as error:
        log.debug("held-out rows not stored as Parquet: %s", error)
        return None
    return buffer.getvalue()


def read_stored(path: Path) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
        yield batch.to_pandas()


def select(source, indices: np.ndarray, pre: Preprocessor) -> pd.DataFrame:
    return source.read_all().iloc[indices]


def file_fingerprint(spec: str) -> dict:
    """What reopen(spec, ...).fingerprint() gives for a data file, without reading its rows."""
    return fingerprint_of(check_path(spec))


def reopen(spec: str, data_config, chunk_rows: int):
    """The source a run recorded, opened again (its fingerprint is checked by the caller)."""
    return open_table(spec, data_config.synthetic, chunk_rows)
