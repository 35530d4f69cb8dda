"""Batches for the trainer: the fast in-memory path and the chunked loader for out-of-memory data.

The fast path keeps a split as tensors (on the training device) and, each epoch, permutes them once
and yields contiguous slices: no per-sample indexing or collation, which is where a
DataLoader(TensorDataset) loop spends most of its time on small models.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from danlu.data.preprocess import Preprocessor
from danlu.data.sources import Table

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x_num, x_cat, y


def split_mask(seed: int, chunk: int, n: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = validation, 2 = test for each row of one chunk; the same on every call."""
    u = np.random.default_rng([seed, chunk]).random(n)
    return np.where(u < val_fraction, 1, np.where(u < val_fraction + test_fraction, 2, 0)).astype(np.int8)


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    # Seeded per epoch, so an epoch's order never depends on what ran before it (resume replays it exactly).
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _slices(tensors: Batch, batch_size: int, perm: torch.Tensor | None, drop_tiny: bool) -> Iterator[Batch]:
    if perm is not None:
        tensors = tuple(t[perm] for t in tensors)  # one gather per epoch, then contiguous slices
    n = len(tensors[2])
    for start in range(0, n, batch_size):
        if drop_tiny and n - start < 2 and start > 0:
            break  # a 1-row batch breaks batch norm and adds only noise
        yield tuple(t[start : start + batch_size] for t in tensors)


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n rows split into `world` near-equal parts (first ones larger)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _sharded(batches: Iterator[Batch], rank: int, world: int) -> Iterator[tuple[Batch, int]]:
    """Each global batch's share for this rank, with the global batch's row count (for loss scaling)."""
    for batch in batches:
        n = len(batch[2])
        lo, hi = share(n, rank, world)
        yield tuple(t[lo:hi] for t in batch), n


def to_tensors(preprocessor: Preprocessor, frame: pd.DataFrame, with_target: bool = True) -> Batch:
    x_num, x_cat = preprocessor.transform(frame)
    if with_target:
        y = torch.from_numpy(preprocessor.encode_target(frame[preprocessor.target]))
    else:
        y = torch.empty(len(frame))
    return torch.from_numpy(x_num), torch.from_numpy(x_cat), y


class TensorPart:
    """A split held in memory as tensors."""

    def __init__(self, x_num: torch.Tensor, x_cat: torch.Tensor, y: torch.Tensor):
        self.tensors: Batch = (x_num, x_cat, y)

    @classmethod
    def from_frame(cls, preprocessor: Preprocessor, frame: pd.DataFrame) -> TensorPart:
        return cls(*to_tensors(preprocessor, frame))

    @property
    def n_rows(self) -> int:
        return len(self.tensors[2])

    def to(self, device: torch.device) -> TensorPart:
        return TensorPart(*(t.to(device) for t in self.tensors))

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        perm = None
        if shuffle is not None:
            perm = torch.randperm(self.n_rows, generator=shuffle).to(self.tensors[2].device)
        return _slices(self.tensors, batch_size, perm, drop_tiny=shuffle is not None)

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """The epoch's global batches in the same order for every process count; each rank gets its share.
        So N processes with global batch B see exactly the rows one process with batch B sees."""
        return _sharded(self.batches(batch_size, shuffle), rank, world)


class ChunkedPart:
    """A split streamed from disk chunk by chunk; only one chunk is in memory at a time."""

    def __init__(
        self,
        table: Table,
        preprocessor: Preprocessor,
        device: torch.device,
        part: int | None = None,
        split: tuple[int, float, float] | None = None,
        n_rows: int = 0,
    ):
        self.table = table
        self.preprocessor = preprocessor
        self.device = device
        self.part = part  # which split_mask value to keep; None keeps every row
        self.split = split  # (seed, val_fraction, test_fraction)
        self.n_rows = n_rows

    def frame(self, chunk: int) -> pd.DataFrame:
        frame = self.table.read_chunk(chunk)
        if self.part is None:
            return frame
        mask = split_mask(self.split[0], chunk, len(frame), self.split[1], self.split[2])
        return frame[mask == self.part]

    def frames(self) -> Iterator[pd.DataFrame]:
        for chunk in range(self.table.n_chunks):
            yield self.frame(chunk)

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        order = range(self.table.n_chunks)
        if shuffle is not None:
            order = torch.randperm(self.table.n_chunks, generator=shuffle).tolist()
        for chunk in order:
            frame = self.frame(chunk)
            if len(frame) == 0:
                continue
            tensors = tuple(t.to(self.device) for t in to_tensors(self.preprocessor, frame))
            perm = None
            if shuffle is not None:
                perm = torch.randperm(len(frame), generator=shuffle).to(self.device)
            yield from _slices(tensors, batch_size, perm, drop_tiny=shuffle is not None)

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """Chunks are dealt out to ranks (the epoch's chunk order, every world-th chunk); each rank takes
        batches of batch_size / world rows from its own chunks, so ranks may take different step counts
        (the trainer joins them with torch.distributed's Join)."""
        if world == 1:
            yield from ((batch, len(batch[2])) for batch in self.batches(batch_size, shuffle))
            return
        order = torch.randperm(self.table.n_chunks, generator=shuffle).tolist()
        local = max(1, batch_size // world)
        for chunk in order[rank::world]:
            frame = self.frame(chunk)
            if len(frame) == 0:
                continue
            tensors = tuple(t.to(self.device) for t in to_tensors(self.preprocessor, frame))
            perm = torch.randperm(len(frame), generator=shuffle).to(self.device)
            for batch in _slices(tensors, local, perm, drop_tiny=True):
                yield batch, len(batch[2]) * world


Part = TensorPart | ChunkedPart
