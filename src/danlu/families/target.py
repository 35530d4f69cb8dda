"""What every family predicts: class indices (classification) or a standardized value (regression).

`Target` maps labels of any type to indices and back, and regression values to standardized floats and
back; `TargetFitter` fits it on training labels, chunk by chunk. Every family's fitted state is a
`FamilyState`: it holds a Target (its `head`) and shares one preprocess.json round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from danlu.errors import DanluError


def row_name(index_label: Any) -> str:
    """'row N' (1-based) for a positional index, else the label itself."""
    if isinstance(index_label, (int, np.integer)):
        return f"row {int(index_label) + 1}"
    return f"row {index_label}"


def json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# the largest magnitude a number the model sees may have: the model, and exported models' raw inputs and
# outputs, are float32, and the fitted moments square the values in float64 (1e200 squared overflows)
FLOAT32_MAX = float(np.finfo(np.float32).max)
RESCALE = "rescale it (other units, or its logarithm)"
MISSING_TARGET_FIX = "drop rows with a missing or infinite target, or fill them in"


def beyond_float32(values: np.ndarray) -> int | None:
    """The first position whose value is infinite or beyond float32's range (NaN is missing: not beyond)."""
    beyond = np.abs(values) > FLOAT32_MAX
    return int(beyond.argmax()) if beyond.any() else None


def range_error(what: str, value: float, where: str, fix: str) -> DanluError:
    """'<what> has <value> at <where>', for an infinite value (fix: the caller's) or one beyond float32's
    range (fix: rescale)."""
    if np.isinf(value):
        return DanluError(f"{what} has {value} at {where}", fix)
    beyond = f"beyond float32's range (±{FLOAT32_MAX:.1e})"
    return DanluError(f"{what} has {value:g} at {where}, {beyond}", RESCALE)


def _sort_labels(labels: set) -> list:
    return sorted(labels, key=lambda v: (type(v).__name__, v))


def check_target(target: pd.Series) -> None:
    """Missing or infinite targets are an error naming the row."""
    missing = target.isna()
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        missing = missing | np.isinf(target.to_numpy(dtype=np.float64, na_value=np.nan))
    if missing.any():
        where = missing.to_numpy().argmax()
        raise DanluError(
            f"target column '{target.name}' has {json_value(target.iloc[where])!r} "
            f"at {row_name(target.index[where])}",
            MISSING_TARGET_FIX,
        )


def regression_values(target: pd.Series) -> np.ndarray:
    """A checked regression target as float64: an error names a value beyond float32's range."""
    values = target.to_numpy(dtype=np.float64)
    where = beyond_float32(values)
    if where is not None:
        at = row_name(target.index[where])
        raise range_error(f"target column '{target.name}'", values[where], at, MISSING_TARGET_FIX)
    return values


def state_json(data: dict[str, Any]) -> str:
    """A family state's preprocess.json text: strict JSON (no NaN)."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def read_state_json(text: str, version: int) -> dict[str, Any]:
    """preprocess.json as a dict; raises DanluError when another format version wrote it."""
    data = json.loads(text)
    if data.get("format") != version:
        raise DanluError(
            f"preprocess.json has format {data.get('format')}, this danlu reads {version}",
            "use the danlu version that wrote the run",
        )
    return data


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


def is_constant(std: float, mean: float) -> bool:
    # relative to the values' size: the spread of float64 rounding in the mean is about 1e-16 * |mean|
    return std <= 1e-12 * max(1.0, abs(mean))


@dataclass
class Target:
    """The target column's task and coding: class names, or the regression mean and std."""

    task: str  # "classification" | "regression"
    name: str
    classes: list[Any] | None = None
    mean: float = 0.0
    std: float = 1.0
    _index: dict[Any, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.classes or [])}

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def encode(self, target: pd.Series) -> np.ndarray:
        """Labels -> class indices (int64), or values -> standardized float32."""
        check_target(target)
        if self.task == "classification":
            codes = target.map(self._index)
            unknown = codes.isna()
            if unknown.any():
                where = unknown.to_numpy().argmax()
                raise DanluError(
                    f"label {json_value(target.iloc[where])!r} at {row_name(target.index[where])} "
                    "was not seen in training",
                    f"known labels: {self.classes}",
                )
            return codes.to_numpy(dtype=np.int64, copy=True)
        return ((regression_values(target) - self.mean) / self.std).astype(np.float32)

    def decode(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs -> class probabilities [n, k] or values in original units [n]."""
        if self.task == "classification":
            shifted = outputs - outputs.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            return exp / exp.sum(axis=1, keepdims=True)
        return outputs.reshape(-1) * self.std + self.mean

    def decode_target(self, encoded: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return encoded
        return encoded.astype(np.float64) * self.std + self.mean

    def labels(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> original labels, typed (int, float, str, bool) when all labels share a type."""
        same_type = len({type(c) for c in self.classes}) == 1
        return np.asarray(self.classes, dtype=None if same_type else object)[indices]

    def to_dict(self) -> dict[str, Any]:
        """The keys every family's JSON carries: task, target, classes, target_mean, target_std."""
        return {
            "task": self.task,
            "target": self.name,
            "classes": self.classes,
            "target_mean": self.mean,
            "target_std": self.std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        return cls(data["task"], data["target"], data["classes"], data["target_mean"], data["target_std"])


class TargetFitter:
    """Fits a Target on training labels, chunk by chunk."""

    def __init__(self, task: str, name: str) -> None:
        self.task, self.name = task, name
        self.labels: set = set()
        self.moments = RunningMoments(1)

    def update(self, target: pd.Series) -> None:
        check_target(target)
        if self.task == "classification":
            self.labels.update(json_value(v) for v in target.unique())
        else:
            self.moments.update(0, regression_values(target))

    def finish(self) -> Target:
        """Raises DanluError for a single class or a constant value: nothing to learn."""
        if self.task == "classification":
            if len(self.labels) < 2:
                raise DanluError(
                    f"target '{self.name}' has a single class {sorted(self.labels, key=str)} "
                    "in the training data",
                    "classification needs at least two classes; check the target column or use data.task",
                )
            return Target("classification", self.name, classes=_sort_labels(self.labels))
        mean, std = float(self.moments.mean[0]), float(self.moments.std[0])
        if is_constant(std, mean):
            raise DanluError(
                f"target '{self.name}' has a single value {mean:g} in the training data",
                "regression needs a target that varies; check the target column",
            )
        return Target("regression", self.name, mean=mean, std=std)


class TargetSide:
    """What every family's state offers about its target, from its `head` (a Target)."""

    head: Target

    task = property(lambda self: self.head.task)
    target = property(lambda self: self.head.name)
    classes = property(lambda self: self.head.classes)
    n_outputs = property(lambda self: self.head.n_outputs)

    def encode_target(self, target: pd.Series) -> np.ndarray:
        return self.head.encode(target)

    def decode(self, outputs: np.ndarray) -> np.ndarray:
        return self.head.decode(outputs)

    def decode_target(self, encoded: np.ndarray) -> np.ndarray:
        return self.head.decode_target(encoded)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        return self.head.labels(indices)

    def prediction_names(self) -> list[str]:
        """The columns a predictions file adds: `prediction` and, for classification, `proba_<class>`."""
        if self.task != "classification":
            return ["prediction"]
        return ["prediction", *(f"proba_{name}" for name in self.classes)]

    def prediction_columns(self, decoded: np.ndarray) -> dict[str, np.ndarray]:
        """prediction_names' columns: labels or values, and each class's probability."""
        names = self.prediction_names()
        if self.task != "classification":
            return {names[0]: decoded}
        probabilities = {name: decoded[:, j] for j, name in enumerate(names[1:])}
        return {names[0]: self.labels(decoded.argmax(axis=1)), **probabilities}


class FamilyState(TargetSide):
    """A family's fitted state: a dataclass with a `head: Target` field, stored as preprocess.json.

    The JSON always carries the format version, the family's name and the target's keys; each family adds
    its own fields (`json_fields`) and builds itself back from them (`from_json_fields`)."""

    family: ClassVar[str]
    format_version: ClassVar[int] = 1

    def json_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> FamilyState:
        raise NotImplementedError

    def to_json(self) -> str:
        data = {"format": self.format_version, "family": self.family, **self.head.to_dict()}
        return state_json({**data, **self.json_fields()})

    @classmethod
    def from_json(cls, text: str) -> FamilyState:
        data = read_state_json(text, cls.format_version)
        return cls.from_json_fields(data, Target.from_dict(data))
