"""Which columns are features, which are categorical, and what the task is."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from danlu.config import DataConfig
from danlu.data.columns import missing_columns_error
from danlu.errors import DanluError

log = logging.getLogger("danlu")
MAX_CLASSES_FOR_INTEGER_TARGET = 20
UNNAMED = re.compile(r"Unnamed: \d+")  # pandas' name for a column whose header cell is empty
# A text column counts as numeric (and its stray values as errors) when this share of values parse.
NUMERIC_SHARE = 0.9


@dataclass(frozen=True)
class Schema:
    task: str  # "classification" | "regression"
    target: str
    numeric: list[str]
    categorical: list[str]
    max_categories: int | None = None  # values kept per categorical column (data.max_categories)


def is_mostly_numeric_text(column: pd.Series) -> bool:
    values = column.dropna()
    if len(values) == 0:
        return False
    parsed = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    return parsed.notna().mean() >= NUMERIC_SHARE


def infer_task(target: pd.Series) -> str:
    values = target.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "classification"
    as_float = values.to_numpy(dtype=np.float64)
    finite = as_float[np.isfinite(as_float)]
    if np.any(finite != np.round(finite)):
        return "regression"
    return "classification" if values.nunique() <= MAX_CLASSES_FOR_INTEGER_TARGET else "regression"


def _all_but(target: str, sample: pd.DataFrame, columns: list[str]) -> list[str]:
    """The default features: every column but the target, less the columns without a name (pandas'
    'Unnamed: N') that hold nothing to learn: none of a value (a trailing comma on every line) or the
    row numbers 0, 1, 2, ... (a DataFrame's index saved with it). As features they taught nothing, or
    the rows' order, and every file to predict would have needed them."""
    left_out = []
    for name in columns:
        if UNNAMED.fullmatch(name):
            values = sample[name]
            if values.isna().all():
                left_out.append((name, "no values: a trailing comma's"))
            elif pd.api.types.is_integer_dtype(values) and np.array_equal(values, np.arange(len(values))):
                left_out.append((name, "the row numbers: an index saved with the file"))
    for name, why in left_out:
        log.info("column '%s' left out of the features (no name, and %s)", name, why)
    dropped = {name for name, _ in left_out}
    return [c for c in columns if c != target and c not in dropped]


def infer_schema(sample: pd.DataFrame, config: DataConfig) -> Schema:
    """Infer features and task from a sample of the training data (the whole frame, or its first chunk)."""
    columns = [str(c) for c in sample.columns]
    target = config.target
    if target is None:
        raise DanluError(
            "data.target is required: name the column to predict, e.g. data.target=label",
            f"columns: {', '.join(columns[:20])}",
        )
    if target not in columns:
        raise missing_columns_error([target], columns, "target column")
    if config.features == []:
        raise DanluError(
            "data.features is empty", "name the feature columns, or leave it out (all but the target)"
        )
    features = config.features if config.features is not None else _all_but(target, sample, columns)
    missing = [c for c in features if c not in columns]
    if missing:
        raise missing_columns_error(missing, columns, "feature column" + ("s" if len(missing) > 1 else ""))
    missing = [c for c in config.categorical if c not in features]
    if missing:
        raise missing_columns_error(
            missing, features, "categorical column" + ("s" if len(missing) > 1 else ""), "the features"
        )
    if target in features:
        raise DanluError(f"'{target}' is both the target and a feature", "remove it from data.features")
    if not features:
        raise DanluError("no feature columns", "the data needs at least one column besides the target")
    numeric, categorical = [], []
    for name in features:
        column = sample[name]
        declared = name in config.categorical
        is_number = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if not declared and (is_number or is_mostly_numeric_text(column)):
            numeric.append(name)
        else:
            categorical.append(name)
    task = config.task if config.task != "auto" else infer_task(sample[target])
    return Schema(task, target, numeric, categorical, config.max_categories)
