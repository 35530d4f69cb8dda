"""From a DataConfig to fitted preprocessing and train/validation/test parts, in memory or chunked."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psutil
import torch

from danlu.config import DataConfig
from danlu.data.batches import ChunkedPart, Part, TensorPart, split_mask
from danlu.data.preprocess import Preprocessor, PreprocessorFitter
from danlu.data.schema import infer_schema
from danlu.data.sources import FrameTable, Table, open_table
from danlu.errors import DanluError

log = logging.getLogger("danlu")

TRAIN, VALIDATION, TEST = 0, 1, 2


VERIFY_SAMPLE_ROWS = 1000  # training rows kept for export verification when a run holds none out


@dataclass
class HeldOut:
    """The rows a run reports its final metrics on, in a form the run directory can record (heldout.py).

    split: "test", "validation", or "none" (no rows held out: then `frame` is a sample of training rows,
    which export verification uses). Exactly one of frame+indices (rows of `table`, in memory), plan
    (chunked: the per-row split of every chunk) or neither (the whole of `table`, a separate file)."""

    split: str
    table: Table
    frame: pd.DataFrame | None = None
    indices: np.ndarray | None = None
    plan: dict | None = None


@dataclass
class Dataset:
    preprocessor: Preprocessor
    train: Part
    validation: Part | None
    test: Part | None
    in_memory: bool
    table: Table  # the training source
    held_out: HeldOut | None  # None once recorded in the run directory


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


def split_indices(frame: pd.DataFrame, config: DataConfig, task: str, target: str):
    """Row positions of train/validation/test (each sorted: file order), stratified by class where every
    class allows it."""
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
    return tuple(np.sort(index) for index in (train, val, test))


def _extra_part(
    spec: str | None, config: DataConfig, preprocessor: Preprocessor, device
) -> tuple[Part | None, Table | None, pd.DataFrame | None]:
    """A separate validation or test file: its part, its table, and its frame when read whole."""
    if spec is None:
        return None, None, None
    table = open_table(spec, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        frame = table.read_all()
        _check_not_empty(frame, spec)
        return TensorPart.from_frame(preprocessor, frame).to(device), table, frame
    return ChunkedPart(table, preprocessor, device, n_rows=table.n_rows), table, None


def _held_out_part(
    split_name: str,
    own: tuple[Part | None, HeldOut | None],
    spec: str | None,
    config: DataConfig,
    preprocessor: Preprocessor,
    device,
) -> tuple[Part | None, HeldOut | None]:
    """A split from the training source when it has rows, else the separate file (if any)."""
    if own[0] is not None:
        return own
    part, table, frame = _extra_part(spec, config, preprocessor, device)
    return part, (HeldOut(split_name, table, frame) if part is not None else None)


def _load_in_memory(table: Table, config: DataConfig, preprocessor: Preprocessor | None, device) -> Dataset:
    frame = table.read_all()
    _check_not_empty(frame, table.name)
    schema = infer_schema(frame, config)
    positions = split_indices(frame, config, schema.task, schema.target)
    train_frame, val_frame, test_frame = (frame.iloc[index] for index in positions)
    _check_not_empty(train_frame, table.name)
    if preprocessor is None:
        fitter = PreprocessorFitter(schema)
        fitter.update(train_frame)
        preprocessor = fitter.finish()
    pre = preprocessor

    def own(name: str, split: pd.DataFrame, index: np.ndarray) -> tuple[Part | None, HeldOut | None]:
        if not len(split):
            return None, None
        return TensorPart.from_frame(pre, split).to(device), HeldOut(name, table, split, index)

    validation, held_val = _held_out_part(
        "validation", own("validation", val_frame, positions[1]), config.validation, config, pre, device
    )
    test, held_test = _held_out_part(
        "test", own("test", test_frame, positions[2]), config.test, config, pre, device
    )
    sample = positions[0][:VERIFY_SAMPLE_ROWS]
    return Dataset(
        preprocessor,
        train=TensorPart.from_frame(preprocessor, train_frame).to(device),
        validation=validation,
        test=test,
        in_memory=True,
        table=table,
        held_out=held_test or held_val or HeldOut("none", table, frame.iloc[sample], sample),
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

    def own(which: int, name: str) -> tuple[Part | None, HeldOut | None]:
        if counts[which] == 0:
            return None, None
        plan = {"seed": split[0], "val_fraction": split[1], "test_fraction": split[2], "part": which}
        plan["chunk_rows"] = config.chunk_rows
        part = ChunkedPart(table, preprocessor, device, which, split, int(counts[which]))
        return part, HeldOut(name, table, plan=plan)

    train, _ = own(TRAIN, "train")
    validation, held_val = _held_out_part(
        "validation", own(VALIDATION, "validation"), config.validation, config, preprocessor, device
    )
    test, held_test = _held_out_part("test", own(TEST, "test"), config.test, config, preprocessor, device)
    sample = first[split_mask(split[0], 0, len(first), split[1], split[2]) == TRAIN].iloc[:VERIFY_SAMPLE_ROWS]
    return Dataset(
        preprocessor,
        train=train,
        validation=validation,
        test=test,
        in_memory=False,
        table=table,
        held_out=held_test or held_val or HeldOut("none", table, sample, sample.index.to_numpy()),
    )


def split_fractions(config: DataConfig) -> tuple[int, float, float]:
    """(seed, validation fraction, test fraction) of the training file; a separate file replaces its split."""
    test_fraction = config.test_fraction if config.test is None else 0.0
    val_fraction = config.val_fraction if config.validation is None else 0.0
    return config.split_seed, val_fraction, test_fraction


def load_dataset(
    config: DataConfig, device: torch.device, preprocessor: Preprocessor | None = None
) -> Dataset:
    """Open the training data, split it, fit preprocessing (unless given, as on resume) and build parts."""
    table = open_table(config.train, config.synthetic, config.chunk_rows)
    if fits_in_memory(table, config):
        return _load_in_memory(table, config, preprocessor, device)
    return _load_chunked(table, config, preprocessor, device)
