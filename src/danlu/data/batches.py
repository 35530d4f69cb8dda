"""Batches for the trainer, shared by every family: named input tensors plus the encoded target.

The fast path keeps a split as tensors (on the training device) and, each epoch, permutes them once and
yields contiguous slices: no per-sample indexing or collation, which is where a DataLoader loop spends
most of its time on small models. Families with other needs (text: per-batch padding; tables larger than
memory: chunks streamed from disk) write their own part: anything that is a `Part`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Batch:
    """Model inputs by name (passed to the model positionally, in this order) and the encoded target."""

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor

    @property
    def rows(self) -> int:
        return self.target.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()}
        return Batch(moved, self.target.to(device, non_blocking=non_blocking))

    def slice(self, lo: int, hi: int) -> Batch:
        return Batch({k: v[lo:hi] for k, v in self.inputs.items()}, self.target[lo:hi])

    def take(self, index: torch.Tensor) -> Batch:
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.target[index])


Augment = Callable[[Batch, torch.Generator], Batch]


class Part(Protocol):
    """A split the trainer, evaluation and the Predictor batch."""

    uneven: bool  # ranks may take different step counts in an epoch (the trainer joins them)

    @property
    def n_rows(self) -> int: ...

    def to(self, device: torch.device) -> Part: ...

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        """Every row once: in order without a generator, else the epoch's training order."""
        ...

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """This rank's share of each of the epoch's global batches, with the global batch's row count."""
        ...


def run_model(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The one forward convention: the batch's inputs, positionally, in their order."""
    return model(*batch.inputs.values())


def split_mask(seed: int, chunk: int, n: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = validation, 2 = test for each row of one chunk; the same on every call."""
    u = np.random.default_rng([seed, chunk]).random(n)
    return np.where(u < val_fraction, 1, np.where(u < val_fraction + test_fraction, 2, 0)).astype(np.int8)


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    # Seeded per epoch, so an epoch's order never depends on what ran before it (resume replays it exactly).
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# Past this size a split is not copied whole in its epoch's order: each batch gathers its own rows
EPOCH_GATHER_BYTES = 16 * 2**20


def nbytes(batch: Batch) -> int:
    return sum(t.element_size() * t.nelement() for t in (*batch.inputs.values(), batch.target))


def slices(batch: Batch, batch_size: int, perm: torch.Tensor | None, drop_tiny: bool) -> Iterator[Batch]:
    """The batches of `batch` in the order `perm` gives (else as it is): one gather per epoch then
    contiguous slices for a small split; for a large one (60,000 images) each batch's own gather, the
    same rows, without a second copy of the split."""
    whole = perm is not None and nbytes(batch) <= EPOCH_GATHER_BYTES
    if whole:
        batch = batch.take(perm)
    n = batch.rows
    for start in range(0, n, batch_size):
        if drop_tiny and n - start < 2 and start > 0:
            break  # a 1-row batch breaks batch norm and adds only noise
        if perm is None or whole:
            yield batch.slice(start, start + batch_size)
        else:
            yield batch.take(perm[start : start + batch_size])


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n rows split into `world` near-equal parts (first ones larger)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def sharded(
    batches: Iterator[Batch], rank: int, world: int, units: Callable[[Batch], int] | None = None
) -> Iterator[tuple[Batch, int]]:
    """Each global batch's share for this rank, with the global batch's units for loss scaling: its rows,
    or `units(batch)` (causal LMs: its trained tokens)."""
    for batch in batches:
        total = batch.rows if units is None else units(batch)
        yield (batch if world == 1 else batch.slice(*share(batch.rows, rank, world))), total


class TensorPart:
    """A split held as tensors; `augment` (images) transforms each training batch.

    With `device` set the data stays where it is (e.g. memory-mapped from disk) and each batch is
    gathered and moved to `device` on its own, instead of the whole split living on the device."""

    uneven = False

    def __init__(self, batch: Batch, augment: Augment | None = None, device: torch.device | None = None):
        self.data = batch
        self.augment = augment
        self.device = device

    @property
    def n_rows(self) -> int:
        return self.data.rows

    def to(self, device: torch.device) -> TensorPart:
        return TensorPart(self.data.to(device), self.augment)

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        perm = None
        if shuffle is not None:
            perm = torch.randperm(self.n_rows, generator=shuffle)
        if self.device is None:
            if perm is not None:
                perm = perm.to(self.data.target.device)
            return slices(self.data, batch_size, perm, drop_tiny=shuffle is not None)
        return self._gathered(batch_size, perm)

    def _gathered(self, batch_size: int, perm: torch.Tensor | None) -> Iterator[Batch]:
        """The same batches as `slices` gives, each gathered from the data on its own."""
        n = self.n_rows
        for start in range(0, n, batch_size):
            if perm is not None and n - start < 2 and start > 0:
                break  # as in `slices`: no 1-row training batch
            if perm is None:
                yield self.data.slice(start, start + batch_size).to(self.device)
            else:
                yield self.data.take(perm[start : start + batch_size]).to(self.device)

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """The epoch's global batches in the same order for every process count; each rank gets its share.
        So N processes with global batch B see exactly the rows one process with batch B sees (augmented
        alike: the global batch is augmented before it is shared out)."""
        batches = self.batches(batch_size, shuffle)
        if self.augment is not None:
            batches = (self.augment(batch, shuffle) for batch in batches)
        return sharded(batches, rank, world)
