"""Preprocessing fitted on the training split only and stored as JSON (never pickle).

Numeric columns: mean imputation, a missing-indicator where training data had gaps, standardization.
Categorical columns: value -> index with 0 as the bucket for unseen or missing values, and for the rarer
values of a column with more than data.max_categories (the model embeds or one-hot encodes them).
Classification labels of any type map to indices and back; regression targets are standardized for
training and reported in original units.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from danlu.errors import DanluError
from danlu.families.tabular.schema import Schema
from danlu.families.target import (
    FamilyState,
    RunningMoments,
    Target,
    TargetFitter,
    beyond_float32,
    is_constant,
    range_error,
    row_name,
)

log = logging.getLogger("danlu")
# a categorical column with at least this many values, most of them seen once, is named in a warning: as a
# category an ID or a timestamp teaches nothing rows to come share (each new value is the unknown one)
ID_LIKE_VALUES = 50


@dataclass
class NumericColumn:
    name: str
    mean: float
    std: float
    indicator: bool  # add a 0/1 "was missing" input


@dataclass
class CategoricalColumn:
    name: str
    values: list[str]  # index 0 is the unknown bucket, so values[i] has index i + 1


def numeric_values(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64, NaN where missing; stray text or inf is an error naming column, row and value."""
    column = frame[name]
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    else:
        parsed = pd.to_numeric(column.astype("string").str.strip(), errors="coerce")
        bad = parsed.isna() & column.notna()
        if bad.any():
            where = bad.to_numpy().argmax()
            raise DanluError(
                f"column '{name}' holds numbers but {row_name(column.index[where])} "
                f"has {column.iloc[where]!r}",
                f"fix or blank that value, or declare the column categorical: data.categorical=[{name}]",
            )
        values = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    where = beyond_float32(values)
    if where is not None:
        raise range_error(
            f"column '{name}'",
            values[where],
            row_name(column.index[where]),
            "replace infinite values with finite ones or leave them empty",
        )
    return values


def category_strings(column: pd.Series) -> pd.Series:
    return column.astype("string").str.strip()


@dataclass
class Preprocessor(FamilyState):
    """The tabular family's fitted state: numeric scalers, categorical vocabularies and the target."""

    numeric: list[NumericColumn]
    categorical: list[CategoricalColumn]
    head: Target
    _lookups: list[dict[str, int]] = field(default_factory=list, repr=False, compare=False)

    family = "tabular"

    def __post_init__(self) -> None:
        self._lookups = [{v: i + 1 for i, v in enumerate(c.values)} for c in self.categorical]
        # the numeric columns' scalers as arrays: transform_raw works on all columns at once
        self._mean = np.array([c.mean for c in self.numeric], dtype=np.float64)
        self._std = np.array([c.std for c in self.numeric], dtype=np.float64)
        self._indicators = np.array([j for j, c in enumerate(self.numeric) if c.indicator], dtype=np.intp)

    target_mean = property(lambda self: self.head.mean)
    target_std = property(lambda self: self.head.std)

    @property
    def features(self) -> list[str]:
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def n_numeric_inputs(self) -> int:
        return len(self.numeric) + sum(c.indicator for c in self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        return [len(c.values) + 1 for c in self.categorical]

    def check_columns(self, frame: pd.DataFrame) -> None:
        missing = [name for name in self.features if name not in frame.columns]
        if missing:
            raise DanluError(
                f"missing required column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
                f"the model needs the features {', '.join(self.features)}",
            )

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Features -> (float32 [n, n_numeric_inputs], int64 [n, n_categorical])."""
        return self.transform_raw(*self.raw_inputs(frame, np.float64))

    def raw_inputs(self, frame: pd.DataFrame, dtype=np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
        """What exported models take: numeric features as float32 [n, n_numeric] with NaN for missing, and
        each categorical feature as stripped strings [n] ("" for missing). Checks columns and numbers."""
        self.check_columns(frame)
        numeric = np.empty((len(frame), len(self.numeric)), dtype=dtype)
        for j, col in enumerate(self.numeric):
            numeric[:, j] = numeric_values(frame, col.name)
        categorical = [
            category_strings(frame[col.name]).fillna("").to_numpy(dtype=object) for col in self.categorical
        ]
        return numeric, categorical

    def raw_records(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """`raw_inputs` for rows already validated as dicts (the server's path: no pandas per request).
        Numbers or None for numeric features; any scalar or None for categorical ones."""
        numeric = np.array(
            [[np.nan if r[c.name] is None else r[c.name] for c in self.numeric] for r in records],
            dtype=np.float64,
        ).reshape(len(records), len(self.numeric))
        categorical = [
            np.array(["" if r[c.name] is None else str(r[c.name]).strip() for r in records], dtype=object)
            for c in self.categorical
        ]
        return numeric, categorical

    def transform_raw(
        self, numeric: np.ndarray, categorical: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw inputs -> model inputs: mean imputation, missing indicators, standardization, value indices."""
        n, k = len(numeric), len(self.numeric)
        x_num = np.empty((n, self.n_numeric_inputs), dtype=np.float32)
        values = numeric.astype(np.float64).reshape(n, k)
        missing = np.isnan(values)
        x_num[:, :k] = (np.where(missing, self._mean, values) - self._mean) / self._std
        x_num[:, k:] = missing[:, self._indicators]  # indicators follow, in column order
        x_cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, (strings, lookup) in enumerate(zip(categorical, self._lookups, strict=True)):
            if n < 1000:  # a dict lookup per value beats a pandas round trip on small batches
                x_cat[:, j] = [lookup.get(v, 0) for v in strings]
            else:
                x_cat[:, j] = pd.Series(strings, dtype=object).map(lookup).fillna(0).to_numpy(dtype=np.int64)
        return x_num, x_cat

    def json_fields(self) -> dict[str, Any]:
        return {
            "numeric": [asdict(c) for c in self.numeric],
            "categorical": [asdict(c) for c in self.categorical],
        }

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> Preprocessor:
        return cls(
            numeric=[NumericColumn(**c) for c in data["numeric"]],
            categorical=[CategoricalColumn(**c) for c in data["categorical"]],
            head=head,
        )


class PreprocessorFitter:
    """Accumulates training statistics chunk by chunk, so data larger than memory fits in one pass."""

    def __init__(self, schema: Schema):
        self.schema = schema
        n = len(schema.numeric)
        self.moments = RunningMoments(n)
        self.missing = np.zeros(n)
        self.counts: list[Counter[str]] = [Counter() for _ in schema.categorical]  # rows per value
        self.target = TargetFitter(schema.task, schema.target)
        self.rows = 0

    def update(self, frame: pd.DataFrame) -> None:
        self.rows += len(frame)
        for j, name in enumerate(self.schema.numeric):
            values = numeric_values(frame, name)
            present = values[~np.isnan(values)]
            self.moments.update(j, present)
            self.missing[j] += len(values) - len(present)
        for j, name in enumerate(self.schema.categorical):
            values = category_strings(frame[name]).dropna()
            values = values[values != ""]  # "" is missing, as in raw_inputs
            self.counts[j].update(values.value_counts(sort=False).to_dict())
        self.target.update(frame[self.schema.target])

    def finish(self) -> Preprocessor:
        if self.rows == 0:
            raise DanluError("the training data has no rows", "check the file and the split fractions")
        mean, std = self.moments.mean, self.moments.std
        numeric = [
            NumericColumn(
                name,
                float(mean[j]),
                1.0 if is_constant(std[j], mean[j]) else float(std[j]),
                bool(self.missing[j]),
            )
            for j, name in enumerate(self.schema.numeric)
        ]
        categorical = [
            self._vocabulary(name, counts)
            for name, counts in zip(self.schema.categorical, self.counts, strict=True)
        ]
        return Preprocessor(numeric, categorical, self.target.finish())

    def _vocabulary(self, name: str, counts: Counter[str]) -> CategoricalColumn:
        """The column's values in sorted order: the max_categories most common (ties in sorted order)."""
        present, cap = counts.total(), self.schema.max_categories
        if len(counts) >= ID_LIKE_VALUES and len(counts) > present / 2:
            log.warning(
                "column '%s' is categorical with %d distinct values in %d training rows: most are seen "
                "once, and a value not seen in training is one unknown value. An ID: leave it out "
                "(data.features); dates or times: turn them into numbers (e.g. days since a date)",
                name,
                len(counts),
                present,
            )
        if cap is None or len(counts) <= cap:
            return CategoricalColumn(name, sorted(counts))
        kept = sorted(counts, key=lambda value: (-counts[value], value))[:cap]
        rare = present - sum(counts[value] for value in kept)
        log.info(
            "column '%s' keeps its %d most common values of %d; the other %d (%d training rows, %.1f%%) "
            "count as unknown (data.max_categories)",
            name,
            cap,
            len(counts),
            len(counts) - cap,
            rare,
            100 * rare / present,
        )
        return CategoricalColumn(name, sorted(kept))
