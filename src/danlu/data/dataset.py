"""What a family's `load` returns: the fitted state, the train/validation/test parts, and the held-out rows
in a form the run directory can record (data/heldout.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from danlu.config import DataConfig

# Training rows a run that holds none out keeps, for export verification
VERIFY_SAMPLE_ROWS = 1000


class Source(Protocol):
    """A data source: its config string, a fingerprint of its content, and whether it still matches a
    fingerprint taken before (Fingerprinted: by taking it again; image folders compare a listing of
    sizes and times first)."""

    name: str

    def fingerprint(self) -> dict: ...

    def matches(self, expected: dict) -> bool: ...


class Fingerprinted:
    """The comparison most sources make: their fingerprint, taken again, equals the one recorded."""

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def matches(self, expected: dict) -> bool:
        return self.fingerprint() == expected


@dataclass
class HeldOut:
    """The rows a run reports its final metrics on.

    split: "test", "validation", or "none" (no rows held out: then `items` is a sample of training rows,
    which export verification uses). Either items (in memory; with `indices`, their positions in
    `source`), or plan (chunked tabular data: the per-row split of every chunk), or neither (the whole of
    `source`, a separate file)."""

    split: str
    source: Source
    items: Any = None
    indices: np.ndarray | None = None
    plan: dict | None = None


@dataclass
class Dataset:
    state: Any  # the family's fitted preprocessing
    train: Any  # parts: TensorPart or a family's own part with the same methods
    validation: Any
    test: Any
    in_memory: bool
    source: Source  # the training source
    held_out: HeldOut | None  # None once recorded in the run directory


def assemble(
    config: DataConfig,
    state: Any,
    train: Any,
    source: Source,
    own: Callable[[str], tuple[Any, HeldOut | None]],
    separate: Callable[[str, str], tuple[Any, HeldOut]],
    sample: Callable[[int], HeldOut],
    in_memory: bool = True,
) -> Dataset:
    """A family's Dataset from its parts. Validation and test are split from the source (`own(name)`, a
    part and its HeldOut, or (None, None) when the split is empty), else read from data.validation /
    data.test (`separate(name, spec)`). The run records the test rows, else the validation rows, else
    `sample(VERIFY_SAMPLE_ROWS)`: that many training rows as a HeldOut of split "none"."""
    parts: dict[str, tuple[Any, HeldOut | None]] = {}
    for name, spec in (("validation", config.validation), ("test", config.test)):
        part, held = own(name)
        if part is None and spec is not None:
            part, held = separate(name, spec)
        parts[name] = (part, held)
    held_out = parts["test"][1] or parts["validation"][1] or sample(VERIFY_SAMPLE_ROWS)
    return Dataset(state, train, parts["validation"][0], parts["test"][0], in_memory, source, held_out)
