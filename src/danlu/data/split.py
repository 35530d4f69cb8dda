"""Train/validation/test splits of a source, shared by every family, and the memory budget."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd

from danlu.config import DataConfig
from danlu.env.probes import memory_room


def split_fractions(config: DataConfig) -> tuple[int, float, float]:
    """(seed, validation fraction, test fraction) of the training source; a separate file replaces its
    split."""
    test_fraction = config.test_fraction if config.test is None else 0.0
    val_fraction = config.val_fraction if config.validation is None else 0.0
    return config.split_seed, val_fraction, test_fraction


def split_indices(n: int, labels: pd.Series | None, config: DataConfig):
    """Positions of train/validation/test (each sorted: source order). With class labels (and
    data.stratify) the splits are stratified where every class allows it."""
    from sklearn.model_selection import train_test_split

    if labels is not None and (not config.stratify or labels.isna().any()):
        labels = None  # the target check names a bad row later
    if labels is not None:  # class codes in sorted order: the same split, without sorting strings
        with contextlib.suppress(TypeError):  # classes that do not sort together: sklearn says so
            labels = pd.Series(pd.factorize(labels, sort=True)[0])

    def split(index: np.ndarray, fraction: float, seed: int):
        if fraction == 0:
            return index, index[:0]
        try:
            by = labels.iloc[index] if labels is not None else None
            return train_test_split(index, test_size=fraction, random_state=seed, stratify=by)
        except ValueError:  # a class too small to stratify: fall back to a plain random split
            return train_test_split(index, test_size=fraction, random_state=seed)

    seed, val_fraction, test_fraction = split_fractions(config)
    rest, test = split(np.arange(n), test_fraction, seed)
    train, val = split(rest, val_fraction / (1 - test_fraction), seed + 1)
    return tuple(np.sort(index) for index in (train, val, test))


def memory_budget(config: DataConfig) -> int:
    """Bytes a data set may take in memory: data.memory_budget_gb, else a quarter of the memory this
    process can still take (in a container, under its limit)."""
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * 2**30)
    return memory_room() // 4
