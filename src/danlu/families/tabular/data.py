"""Tabular data: from a DataConfig to fitted preprocessing and train/validation/test parts, in memory as
tensors or streamed from disk chunk by chunk (ChunkedPart)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from danlu.config import DataConfig
from danlu.data.batches import Batch, TensorPart, sharded, slices, split_mask
from danlu.data.columns import no_rows_error
from danlu.data.dataset import Dataset, HeldOut, assemble
from danlu.data.sources import FrameTable, Table, open_table
from danlu.data.split import memory_budget, split_fractions, split_indices
from danlu.families.tabular.preprocess import Preprocessor, PreprocessorFitter
from danlu.families.tabular.schema import infer_schema

log = logging.getLogger("danlu")

TRAIN, VALIDATION, TEST = 0, 1, 2


def fits_in_memory(table: Table, config: DataConfig) -> bool:
    if isinstance(table, FrameTable):
        return True  # already read whole (CSV, NPZ, synthetic)
    if config.in_memory != "auto":
        return bool(config.in_memory)
    # Preprocessed tensors plus the frame they come from take about twice the raw size.
    return 2 * table.nbytes <= memory_budget(config)


def _check_not_empty(frame: pd.DataFrame, name: str) -> None:
    if len(frame) == 0:
        raise no_rows_error(name)


def model_inputs(pre: Preprocessor, x_num: np.ndarray, x_cat: np.ndarray) -> dict[str, torch.Tensor]:
    """The model's inputs: x_num, and x_cat only when the data has categorical columns."""
    inputs = {"x_num": torch.from_numpy(x_num)}
    if pre.categorical:
        inputs["x_cat"] = torch.from_numpy(x_cat)
    return inputs


def to_batch(pre: Preprocessor, frame: pd.DataFrame) -> Batch:
    return Batch(
        model_inputs(pre, *pre.transform(frame)), torch.from_numpy(pre.encode_target(frame[pre.target]))
    )


def tensor_part(pre: Preprocessor, frame: pd.DataFrame, device) -> TensorPart:
    return TensorPart(to_batch(pre, frame)).to(device)


class ChunkedPart:
    """A split streamed from disk chunk by chunk; only one chunk is in memory at a time."""

    uneven = True  # ranks may take different step counts: the trainer joins them

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

    def _chunk_batch(self, chunk: int) -> Batch | None:
        frame = self.frame(chunk)
        return to_batch(self.preprocessor, frame).to(self.device) if len(frame) else None

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[Batch]:
        order = range(self.table.n_chunks)
        if shuffle is not None:
            order = torch.randperm(self.table.n_chunks, generator=shuffle).tolist()
        for chunk in order:
            batch = self._chunk_batch(chunk)
            if batch is None:
                continue
            perm = None
            if shuffle is not None:
                perm = torch.randperm(batch.rows, generator=shuffle).to(self.device)
            yield from slices(batch, batch_size, perm, drop_tiny=shuffle is not None)

    def train_batches(
        self, batch_size: int, shuffle: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """Chunks are dealt out to ranks (the epoch's chunk order, every world-th chunk); each rank takes
        batches of batch_size / world rows from its own chunks, so ranks may take different step counts
        (the trainer joins them with torch.distributed's Join)."""
        if world == 1:
            yield from sharded(self.batches(batch_size, shuffle), 0, 1)
            return
        order = torch.randperm(self.table.n_chunks, generator=shuffle).tolist()
        local = max(1, batch_size // world)
        for chunk in order[rank::world]:
            batch = self._chunk_batch(chunk)
            if batch is None:
                continue
            perm = torch.randperm(batch.rows, generator=shuffle).to(self.device)
            for piece in slices(batch, local, perm, drop_tiny=True):
                yield piece, piece.rows * world


def _separate(name: str, spec: str, config: DataConfig, pre: Preprocessor, device):
    """A separate validation/test file as a part, with the HeldOut that records it."""
    table = open_table(spec, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        frame = table.read_all()
        _check_not_empty(frame, spec)
        return tensor_part(pre, frame, device), HeldOut(name, table, frame)
    return ChunkedPart(table, pre, device, n_rows=table.n_rows), HeldOut(name, table)


def _load_in_memory(table: Table, config: DataConfig, pre: Preprocessor | None, device) -> Dataset:
    frame = table.read_all()
    _check_not_empty(frame, table.name)
    schema = infer_schema(frame, config)
    labels = frame[schema.target] if schema.task == "classification" else None
    positions = split_indices(len(frame), labels, config)
    train_frame = frame.iloc[positions[0]]
    _check_not_empty(train_frame, table.name)
    if pre is None:
        fitter = PreprocessorFitter(schema)
        fitter.update(train_frame)
        pre = fitter.finish()
    index = {"validation": positions[1], "test": positions[2]}

    def own(name: str):
        if not len(index[name]):
            return None, None
        split = frame.iloc[index[name]]
        return tensor_part(pre, split, device), HeldOut(name, table, split, index[name])

    def sample(rows: int) -> HeldOut:
        kept = positions[0][:rows]
        return HeldOut("none", table, frame.iloc[kept], kept)

    return assemble(
        config,
        pre,
        tensor_part(pre, train_frame, device),
        table,
        own,
        lambda name, spec: _separate(name, spec, config, pre, device),
        sample,
    )


def _load_chunked(table: Table, config: DataConfig, pre: Preprocessor | None, device) -> Dataset:
    log.info(
        "training data %s (%.1f GB) is over the memory budget: training in chunks",
        table.name,
        table.nbytes / 2**30,
    )
    split = split_fractions(config)
    first = table.read_chunk(0)
    _check_not_empty(first, table.name)
    fitter = PreprocessorFitter(infer_schema(first, config))
    counts = np.zeros(3, dtype=np.int64)
    # One streaming pass counts the splits and (for a new run) fits preprocessing on training rows only.
    for chunk in range(table.n_chunks):
        frame = first if chunk == 0 else table.read_chunk(chunk)
        mask = split_mask(split[0], chunk, len(frame), split[1], split[2])
        counts += np.bincount(mask, minlength=3)
        if pre is None:
            fitter.update(frame[mask == TRAIN])
    pre = pre or fitter.finish()
    which = {"train": TRAIN, "validation": VALIDATION, "test": TEST}

    def own(name: str):
        if counts[which[name]] == 0:
            return None, None
        plan = {"seed": split[0], "val_fraction": split[1], "test_fraction": split[2], "part": which[name]}
        plan["chunk_rows"] = config.chunk_rows
        part = ChunkedPart(table, pre, device, which[name], split, int(counts[which[name]]))
        return part, HeldOut(name, table, plan=plan)

    def sample(rows: int) -> HeldOut:
        kept = first[split_mask(split[0], 0, len(first), split[1], split[2]) == TRAIN].iloc[:rows]
        return HeldOut("none", table, kept, kept.index.to_numpy())

    return assemble(
        config,
        pre,
        own("train")[0],
        table,
        own,
        lambda name, spec: _separate(name, spec, config, pre, device),
        sample,
        in_memory=False,
    )


def load(
    config: DataConfig,
    device: torch.device,
    state: Preprocessor | None = None,
    cache=None,
    model=None,
    train=None,
) -> Dataset:
    """Open the training data, split it, fit preprocessing (unless given, as on resume) and build parts.
    (Tables need no cache directory: NPY and Parquet are read from the files themselves; the model
    config plays no part in preprocessing.)"""
    table = open_table(config.train, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        return _load_in_memory(table, config, state, device)
    return _load_chunked(table, config, state, device)


def plan_frames(table: Table, plan: dict) -> Iterator[pd.DataFrame]:
    """The rows a chunked run held out, chunk by chunk, from its recorded plan."""
    for chunk in range(table.n_chunks):
        frame = table.read_chunk(chunk)
        mask = split_mask(plan["seed"], chunk, len(frame), plan["val_fraction"], plan["test_fraction"])
        yield frame[mask == plan["part"]]
