"""What a family's `load` returns: the fitted state, the train/validation/test parts, and the held-out rows
in a form the run directory can record (data/heldout.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Source(Protocol):
    """A data source: its config string and a fingerprint of its content."""

    name: str

    def fingerprint(self) -> dict: ...


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
