"""`danlu tune`'s search space: a YAML mapping of danlu's own key paths to ranges or choices,

```yaml
train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
train.batch_size: {choices: [32, 64, 128]}
model.hidden: {choices: [[64], [256, 256]]}
model.dropout: {low: 0, high: 0.5}
train.epochs: {low: 10, high: 50, step: 10}   # whole numbers at both ends: an integer range
```

checked against the config schema (every bound and choice must make a valid config) before any trial
runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu.config import validate
from danlu.errors import DanluError

_RANGE_KEYS = {"low", "high", "log", "step"}
_FIX = "write KEY: {low: A, high: B[, log: true][, step: S]} or KEY: {choices: [...]}; see README"


@dataclass(frozen=True)
class Dimension:
    """One searched key: a float or int range, or a list of choices (any YAML values)."""

    key: str
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def values(self) -> list[Any]:
        """The values that bound this dimension: both ends of a range, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for an Optuna trial (choices go through Optuna as JSON text: it takes
        only scalars, and model.hidden's choices are lists)."""
        if self.kind == "choice":
            return json.loads(trial.suggest_categorical(self.key, [self.encode(c) for c in self.choices]))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> Any:
        """The Optuna distribution of this dimension (Ray Tune's OptunaSearch takes them)."""
        from optuna import distributions

        if self.kind == "choice":
            return distributions.CategoricalDistribution([self.encode(c) for c in self.choices])
        if self.kind == "int":
            return distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def encode(self, value: Any) -> Any:
        """A config value as Optuna stores it (choices as JSON text)."""
        return json.dumps(value) if self.kind == "choice" else value

    def decode(self, value: Any) -> Any:
        """A value as Optuna stores it back to the config's value."""
        return json.loads(value) if self.kind == "choice" else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"search space key '{key}'"
    if not isinstance(spec, dict):
        raise DanluError(f"{where}: expected a mapping, got {spec!r}", _FIX)
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise DanluError(f"{where}: choices go alone, not with {', '.join(extra)}", _FIX)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise DanluError(f"{where}: choices must be a non-empty list, got {choices!r}", _FIX)
        return Dimension(key, "choice", choices=tuple(choices))
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown or not {"low", "high"} <= set(spec):
        what = f"unknown field(s) {', '.join(unknown)}" if unknown else "a range needs low and high"
        raise DanluError(f"{where}: {what}", _FIX)
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)) or low > high:
        raise DanluError(
            f"{where}: low and high must be numbers with low <= high, got {low!r}, {high!r}", _FIX
        )
    if not isinstance(log, bool) or (log and low <= 0):
        raise DanluError(f"{where}: log must be true or false, and a log range must be above 0", _FIX)
    if step is not None and (not _is_number(step) or step <= 0 or log):
        raise DanluError(f"{where}: step must be a positive number, and not with log", _FIX)
    whole = _is_int(low) and _is_int(high) and (step is None or _is_int(step))
    return Dimension(key, "int" if whole else "float", low, high, log, step)


def parse_space(
    raw: Any, base: dict[str, Any], source: str = "the search space", check: bool = True
) -> list[Dimension]:
    """The dimensions of a space mapping, each checked against the config `base` (a raw config dict):
    every bound and choice must give a valid config. One line naming the key otherwise. check=False:
    a space already checked (a search's own), read without validating a config per value again.

    Raises:
        DanluError: an empty space, a malformed entry, an unknown key or a value of the wrong type.
    """
    if not isinstance(raw, dict) or not raw:
        raise DanluError(f"{source} must be a non-empty mapping of config keys", _FIX)
    dimensions = [_dimension(str(key), spec) for key, spec in raw.items()]
    for dim in dimensions if check else ():
        for value in dim.values():
            try:
                validate(with_values(base, {dim.key: value}))
            except DanluError as error:
                message = error.message.removeprefix("invalid config: ")
                raise DanluError(
                    f"search space key '{dim.key}' = {value!r} does not make a valid config: {message}",
                    "use a key path and values that `danlu train` takes (see `danlu train --help`)",
                ) from None
    return dimensions


def read_space_file(path: str | Path) -> Any:
    """A search space YAML file's contents, which parse_space checks.

    Raises:
        DanluError: the file is missing, or not YAML.
    """
    from danlu.config import load_yaml

    if not Path(path).is_file():
        raise DanluError(f"search space file '{path}' not found", "pass --space SPACE.yaml")
    return load_yaml(path)


def with_values(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config `base` with each dotted key set to its value (as typed: not through
    YAML text, where 1e-05 would be a string)."""
    raw = json.loads(json.dumps(base))
    for key, value in params.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DanluError(f"search space key '{key}': '{part}' is not a section", "check the key path")
            node = child
        node[last] = value
    return raw
