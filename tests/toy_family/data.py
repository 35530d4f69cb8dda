"""Sequences on disk (NPZ: `sequences` [n, length], `labels` [n]) to fitted state, parts, items, held-out
rows and prediction files, with nothing but danlu's shared pieces (splits, parts, Target)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from danlu.data.batches import Batch, TensorPart
from danlu.data.dataset import Fingerprinted, HeldOut, assemble
from danlu.data.sources import check_path, file_fingerprint
from danlu.data.split import split_indices
from danlu.errors import DanluError
from danlu.families.target import TargetFitter
from tests.toy_family.state import SequenceState


@dataclass
class SequenceItems:
    x: np.ndarray  # float32 [n, length]
    labels: np.ndarray | None = None


class SequenceSource(Fingerprinted):
    def __init__(self, spec: str) -> None:
        path = check_path(spec)
        with np.load(path, allow_pickle=False) as archive:
            self.x = archive["sequences"].astype(np.float32)
            self.labels = archive["labels"] if "labels" in archive.files else None
        self.name, self.path = spec, path

    def fingerprint(self) -> dict:
        return file_fingerprint(self.path)

    def items(self, index: np.ndarray | slice) -> SequenceItems:
        return SequenceItems(self.x[index], None if self.labels is None else self.labels[index])


def as_array(items) -> np.ndarray:
    """float32 [n, length] of items, or of the server's list of sequences."""
    return items.x if isinstance(items, SequenceItems) else np.stack(items).astype(np.float32)


def count(items) -> int:
    return len(items.x) if isinstance(items, SequenceItems) else len(items)


def nbytes(items: SequenceItems) -> int:
    return int(items.x.nbytes)


def inputs(state: SequenceState, items) -> dict[str, torch.Tensor]:
    return {"x": torch.from_numpy(as_array(items))}


def as_items(state: SequenceState, data) -> SequenceItems:
    if isinstance(data, SequenceItems):
        return data
    array = np.asarray(data, dtype=np.float32)
    return SequenceItems(array[None, :] if array.ndim == 1 else array)


def targets(state: SequenceState, items: SequenceItems) -> np.ndarray:
    if items.labels is None:
        raise DanluError("these sequences have no labels", "evaluate an NPZ file with `labels`")
    return state.decode_target(state.encode_target(pd.Series(items.labels)))


def output_frame(state: SequenceState, items: SequenceItems, decoded: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"row": np.arange(count(items)), **state.prediction_columns(decoded)})


def read(spec: str, state: SequenceState, chunk_rows: int = 4096) -> Iterator[SequenceItems]:
    source = SequenceSource(spec)
    for start in range(0, len(source.x), chunk_rows):
        yield source.items(slice(start, start + chunk_rows))


def store_rows(items: SequenceItems) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, sequences=items.x, labels=items.labels)
    return buffer.getvalue()


def read_stored(path: Path) -> Iterator[SequenceItems]:
    with np.load(path, allow_pickle=False) as archive:
        yield SequenceItems(archive["sequences"], archive["labels"])


def select(source: SequenceSource, indices: np.ndarray, state: SequenceState) -> SequenceItems:
    return source.items(indices)


def reopen(spec: str, data_config, chunk_rows: int) -> SequenceSource:
    return SequenceSource(spec)


def _part(state: SequenceState, items: SequenceItems, device) -> TensorPart:
    target = torch.from_numpy(state.encode_target(pd.Series(items.labels)))
    return TensorPart(Batch({"x": torch.from_numpy(items.x)}, target)).to(device)


def load(config, device, state: SequenceState | None = None, cache=None, model=None, train=None):
    source = SequenceSource(config.train)
    if source.labels is None:
        raise DanluError(f"'{config.train}' has no labels", "add a `labels` array to the NPZ file")
    task = "regression" if config.task == "regression" else "classification"
    labels = pd.Series(source.labels)
    train, validation, test = split_indices(len(labels), labels if task == "classification" else None, config)
    if state is None:
        fitter = TargetFitter(task, config.target or "label")
        fitter.update(labels.iloc[train].reset_index(drop=True))
        values = source.x[train]
        state = SequenceState(
            source.x.shape[1], float(values.mean()), float(values.std() or 1.0), fitter.finish()
        )
    index = {"validation": validation, "test": test}

    def own(name: str):
        if not len(index[name]):
            return None, None
        items = source.items(index[name])
        return _part(state, items, device), HeldOut(name, source, items, index[name])

    def separate(name: str, spec: str):
        other = SequenceSource(spec)
        items = other.items(slice(None))
        return _part(state, items, device), HeldOut(name, other, items)

    def sample(rows: int) -> HeldOut:
        return HeldOut("none", source, source.items(train[:rows]), train[:rows])

    return assemble(config, state, _part(state, source.items(train), device), source, own, separate, sample)
