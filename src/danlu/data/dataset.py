"""From a DataConfig to fitted preprocessing and train/validation/test parts, in memory or chunked."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psutil
import torch

from danlu.config import DataConfig
from danlu.data.batches import ChunkedPart, Part, TensorPart, split_mask
from danlu.data.preprocess import Preprocessor, PreprocessorFitter
from danlu.data.schema import infer_schema
from danlu.data.sources import FrameTable, Table, open_table, stream_frames
from danlu.errors import DanluError

log = logging.getLogger("danlu")

TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass
class Dataset:
    preprocessor: Preprocessor
    train: Part
    validation: Part | None
    test: Part | None
    in_memory: bool


def memory_budget(config: DataConfig) -> int:
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * 2**30)
    return psutil.virtual_memory().available // 4


def fits_in_memory(table: Table, config: DataConfig) -> bool:
    if isinstance(table, FrameTable):
        return True  # already read whole (CSV, NPZ, synthetic)
    if config.in_memory != "auto":
        return bool(config.in_memory)
    # Preprocessed tensors plus the frame they come from take about twice the raw size.
    return 2 * table.nbytes <= memory_budget(config)


def _check_not_empty(frame: pd.DataFrame, name: str) -> None:
    if len(frame) == 0:
        raise DanluError(f"'{name}' has no data rows", "pass a file with at least a few rows")


def split_frame(frame: pd.DataFrame, config: DataConfig, task: str, target: str):
    """Train/validation/test frames (rows in file order), stratified by class where every class allows it."""
    from sklearn.model_selection import train_test_split

    labels = frame[target] if task == "classification" and config.stratify else None
    if labels is not None and labels.isna().any():
        labels = None  # the target check names the bad row later

    def split(index: np.ndarray, fraction: float, seed: int):
        if fraction == 0:
            return index, index[:0]
        try:
            by = labels.iloc[index] if labels is not None else None
            return train_test_split(index, test_size=fraction, random_state=seed, stratify=by)
        except ValueError:  # a class too small to stratify: fall back to a plain random split
            return train_test_split(index, test_size=fraction, random_state=seed)

    _, val_fraction, test_fraction = split_fractions(config)
    rest, test = split(np.arange(len(frame)), test_fraction, config.split_seed)
    train, val = split(rest, val_fraction / (1 - test_fraction), config.split_seed + 1)
    return tuple(frame.iloc[np.sort(index)] for index in (train, val, test))


def _extra_part(spec: str | None, config: DataConfig, preprocessor: Preprocessor, device) -> Part | None:
    if spec is None:
        return None
    table = open_table(spec, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        frame = table.read_all()
        _check_not_empty(frame, spec)
        return TensorPart.from_frame(preprocessor, frame).to(device)
    return ChunkedPart(table, preprocessor, device, n_rows=table.n_rows)


def _load_in_memory(table: Table, config: DataConfig, preprocessor: Preprocessor | None, device) -> Dataset:
    frame = table.read_all()
    _check_not_empty(frame, table.name)
    schema = infer_schema(frame, config)
    train_frame, val_frame, test_frame = split_frame(frame, config, schema.task, schema.target)
    _check_not_empty(train_frame, table.name)
    if preprocessor is None:
        fitter = PreprocessorFitter(schema)
        fitter.update(train_frame)
        preprocessor = fitter.finish()

    def part(split: pd.DataFrame) -> Part | None:
        return TensorPart.from_frame(preprocessor, split).to(device) if len(split) else None

    return Dataset(
        preprocessor,
        train=TensorPart.from_frame(preprocessor, train_frame).to(device),
        validation=part(val_frame) or _extra_part(config.validation, config, preprocessor, device),
        test=part(test_frame) or _extra_part(config.test, config, preprocessor, device),
        in_memory=True,
    )


def _load_chunked(table: Table, config: DataConfig, preprocessor: Preprocessor | None, device) -> Dataset:
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
        if preprocessor is None:
            fitter.update(frame[mask == TRAIN])
    preprocessor = preprocessor or fitter.finish()

    def part(which: int) -> ChunkedPart | None:
        if counts[which] == 0:
            return None
        return ChunkedPart(table, preprocessor, device, which, split, int(counts[which]))

    return Dataset(
        preprocessor,
        train=part(TRAIN),
        validation=part(VALIDATION) or _extra_part(config.validation, config, preprocessor, device),
        test=part(TEST) or _extra_part(config.test, config, preprocessor, device),
        in_memory=False,
    )


def split_fractions(config: DataConfig) -> tuple[int, float, float]:
    """(seed, validation fraction, test fraction) of the training file; a separate file replaces its split."""
    test_fraction = config.test_fraction if config.test is None else 0.0
    val_fraction = config.val_fraction if config.validation is None else 0.0
    return config.split_seed, val_fraction, test_fraction


def held_out_frames(config: DataConfig, preprocessor: Preprocessor) -> tuple[str, Iterator[pd.DataFrame]]:
    """The run's test split (or, without one, its validation split) rebuilt as frames, chunk by chunk."""
    if config.test is not None:
        return "test", stream_frames(config.test)
    table = open_table(config.train, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        _, val, test = split_frame(table.read_all(), config, preprocessor.task, preprocessor.target)
        if len(test):
            return "test", iter([test])
        if config.validation is not None:
            return "validation", stream_frames(config.validation)
        return "validation", iter([val])
    split = split_fractions(config)
    which = TEST if split[2] > 0 else VALIDATION
    if which == VALIDATION and config.validation is not None:
        return "validation", stream_frames(config.validation)
    part = ChunkedPart(table, preprocessor, torch.device("cpu"), which, split)
    return ("test" if which == TEST else "validation"), part.frames()


def load_dataset(
    config: DataConfig, device: torch.device, preprocessor: Preprocessor | None = None
) -> Dataset:
    """Open the training data, split it, fit preprocessing (unless given, as on resume) and build parts."""
    table = open_table(config.train, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        return _load_in_memory(table, config, preprocessor, device)
    return _load_chunked(table, config, preprocessor, device)
