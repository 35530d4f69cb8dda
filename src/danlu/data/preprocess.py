"""Preprocessing fitted on the training split only and stored as JSON (never pickle).

Numeric columns: mean imputation, a missing-indicator where training data had gaps, standardization.
Categorical columns: value -> index with 0 as the bucket for unseen or missing values (the model embeds
or one-hot encodes them). Classification labels of any type map to indices and back; regression targets
are standardized for training and reported in original units.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from danlu.data.schema import Schema
from danlu.errors import DanluError

FORMAT_VERSION = 1


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


def _row(index_label: Any) -> str:
    return (
        f"row {int(index_label) + 1}" if isinstance(index_label, (int, np.integer)) else f"row {index_label}"
    )


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
                f"column '{name}' holds numbers but {_row(column.index[where])} has {column.iloc[where]!r}",
                f"fix or blank that value, or declare the column categorical: data.categorical=[{name}]",
            )
        values = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(values)
    if infinite.any():
        where = infinite.argmax()
        raise DanluError(
            f"column '{name}' has {values[where]} at {_row(column.index[where])}",
            "replace infinite values with finite ones or leave them empty",
        )
    return values


def category_strings(column: pd.Series) -> pd.Series:
    return column.astype("string").str.strip()


def _json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _sort_labels(labels: set) -> list:
    return sorted(labels, key=lambda v: (type(v).__name__, v))


@dataclass
class Preprocessor:
    task: str
    target: str
    numeric: list[NumericColumn]
    categorical: list[CategoricalColumn]
    classes: list[Any] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    _lookups: list[dict[str, int]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._lookups = [{v: i + 1 for i, v in enumerate(c.values)} for c in self.categorical]
        self._class_index = {c: i for i, c in enumerate(self.classes or [])}

    @property
    def features(self) -> list[str]:
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def n_numeric_inputs(self) -> int:
        return len(self.numeric) + sum(c.indicator for c in self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        return [len(c.values) + 1 for c in self.categorical]

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

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
        n = len(numeric)
        x_num = np.empty((n, self.n_numeric_inputs), dtype=np.float32)
        extra = len(self.numeric)
        for j, col in enumerate(self.numeric):
            values = numeric[:, j].astype(np.float64)  # a copy: imputation writes into it
            missing = np.isnan(values)
            if col.indicator:
                x_num[:, extra] = missing
                extra += 1
            values[missing] = col.mean
            x_num[:, j] = (values - col.mean) / col.std
        x_cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, (strings, lookup) in enumerate(zip(categorical, self._lookups, strict=True)):
            if n < 1000:  # a dict lookup per value beats a pandas round trip on small batches
                x_cat[:, j] = [lookup.get(v, 0) for v in strings]
            else:
                x_cat[:, j] = pd.Series(strings, dtype=object).map(lookup).fillna(0).to_numpy(dtype=np.int64)
        return x_num, x_cat

    def encode_target(self, target: pd.Series) -> np.ndarray:
        """Labels -> class indices (int64), or values -> standardized float32."""
        _check_target(target)
        if self.task == "classification":
            codes = target.map(self._class_index)
            unknown = codes.isna()
            if unknown.any():
                where = unknown.to_numpy().argmax()
                raise DanluError(
                    f"label {_json_value(target.iloc[where])!r} at {_row(target.index[where])} "
                    "was not seen in training",
                    f"known labels: {self.classes}",
                )
            return codes.to_numpy(dtype=np.int64, copy=True)
        values = target.to_numpy(dtype=np.float64)
        return ((values - self.target_mean) / self.target_std).astype(np.float32)

    def decode(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs -> class probabilities [n, k] or values in original units [n]."""
        if self.task == "classification":
            shifted = outputs - outputs.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            return exp / exp.sum(axis=1, keepdims=True)
        return outputs.reshape(-1) * self.target_std + self.target_mean

    def decode_target(self, encoded: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return encoded
        return encoded.astype(np.float64) * self.target_std + self.target_mean

    def labels(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> original labels, typed (int, float, str, bool) when all labels share a type."""
        same_type = len({type(c) for c in self.classes}) == 1
        return np.asarray(self.classes, dtype=None if same_type else object)[indices]

    def to_json(self) -> str:
        data = {
            "format": FORMAT_VERSION,
            "task": self.task,
            "target": self.target,
            "numeric": [asdict(c) for c in self.numeric],
            "categorical": [asdict(c) for c in self.categorical],
            "classes": self.classes,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise DanluError(
                f"preprocess.json has format {data.get('format')}, this danlu reads {FORMAT_VERSION}",
                "use the danlu version that wrote the run",
            )
        return cls(
            task=data["task"],
            target=data["target"],
            numeric=[NumericColumn(**c) for c in data["numeric"]],
            categorical=[CategoricalColumn(**c) for c in data["categorical"]],
            classes=data["classes"],
            target_mean=data["target_mean"],
            target_std=data["target_std"],
        )


def _check_target(target: pd.Series) -> None:
    missing = target.isna()
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        missing = missing | np.isinf(target.to_numpy(dtype=np.float64, na_value=np.nan))
    if missing.any():
        where = missing.to_numpy().argmax()
        raise DanluError(
            f"target column '{target.name}' has {_json_value(target.iloc[where])!r} "
            f"at {_row(target.index[where])}",
            "drop rows with a missing or infinite target, or fill them in",
        )


class RunningMoments:
    """Count, mean and sum of squared deviations (M2) per column, merged chunk by chunk with Chan et al.'s
    update: exact for values far from zero, where E[x^2] - mean^2 cancels to noise (1e8 +- 0.01)."""

    def __init__(self, columns: int) -> None:
        self.count = np.zeros(columns)
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)

    def update(self, j: int, values: np.ndarray) -> None:
        """Add one column's present (non-NaN) values."""
        n = len(values)
        if n == 0:
            return
        chunk_mean = float(values.mean())
        chunk_m2 = float(np.square(values - chunk_mean).sum())
        total = self.count[j] + n
        delta = chunk_mean - self.mean[j]
        self.mean[j] += delta * n / total
        self.m2[j] += chunk_m2 + delta**2 * self.count[j] * n / total
        self.count[j] = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (0 for a column without values)."""
        return np.sqrt(np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0))


def _is_constant(std: float, mean: float) -> bool:
    # relative to the values' size: the spread of float64 rounding in the mean is about 1e-16 * |mean|
    return std <= 1e-12 * max(1.0, abs(mean))


class PreprocessorFitter:
    """Accumulates training statistics chunk by chunk, so data larger than memory fits in one pass."""

    def __init__(self, schema: Schema):
        self.schema = schema
        n = len(schema.numeric)
        self.moments = RunningMoments(n)
        self.missing = np.zeros(n)
        self.seen: list[set[str]] = [set() for _ in schema.categorical]
        self.labels: set = set()
        self.target_moments = RunningMoments(1)
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
            self.seen[j].update(values[values != ""].unique())  # "" is missing, as in raw_inputs
        target = frame[self.schema.target]
        _check_target(target)
        if self.schema.task == "classification":
            self.labels.update(_json_value(v) for v in target.unique())
        else:
            self.target_moments.update(0, target.to_numpy(dtype=np.float64))

    def finish(self) -> Preprocessor:
        if self.rows == 0:
            raise DanluError("the training data has no rows", "check the file and the split fractions")
        mean, std = self.moments.mean, self.moments.std
        numeric = [
            NumericColumn(
                name,
                float(mean[j]),
                1.0 if _is_constant(std[j], mean[j]) else float(std[j]),
                bool(self.missing[j]),
            )
            for j, name in enumerate(self.schema.numeric)
        ]
        categorical = [
            CategoricalColumn(name, sorted(self.seen[j])) for j, name in enumerate(self.schema.categorical)
        ]
        if self.schema.task == "classification":
            if len(self.labels) < 2:
                raise DanluError(
                    f"target '{self.schema.target}' has a single class {sorted(self.labels, key=str)} "
                    "in the training data",
                    "classification needs at least two classes; check the target column or use data.task",
                )
            return Preprocessor(
                "classification", self.schema.target, numeric, categorical, classes=_sort_labels(self.labels)
            )
        target_mean, target_std = float(self.target_moments.mean[0]), float(self.target_moments.std[0])
        if _is_constant(target_std, target_mean):
            raise DanluError(
                f"target '{self.schema.target}' has a single value {target_mean:g} in the training data",
                "regression needs a target that varies; check the target column",
            )
        return Preprocessor(
            "regression",
            self.schema.target,
            numeric,
            categorical,
            target_mean=target_mean,
            target_std=target_std,
        )
