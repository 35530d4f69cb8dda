"""Train/validation/test splits of a source, shared by every family, and the memory budget."""

from __future__ import annotations

import contextlib
import math

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
    if labels is not None and (not config.stratify or labels.isna().any()):
        labels = None  # the target check names a bad row later
    if labels is not None:  # class codes in sorted order: the same split, without sorting strings
        with contextlib.suppress(TypeError):  # classes that do not sort together: np.unique says so
            labels = pd.Series(pd.factorize(labels, sort=True)[0])

    def split(index: np.ndarray, fraction: float, seed: int):
        if fraction == 0:
            return index, index[:0]
        try:
            by = labels.iloc[index].to_numpy() if labels is not None else None
            train, test = shuffle_split(len(index), fraction, seed, by)
        except _Unstratifiable:  # a class too small to stratify: fall back to a plain random split
            train, test = shuffle_split(len(index), fraction, seed)
        return index[train], index[test]

    seed, val_fraction, test_fraction = split_fractions(config)
    rest, test = split(np.arange(n), test_fraction, seed)
    train, val = split(rest, val_fraction / (1 - test_fraction), seed + 1)
    return tuple(np.sort(index) for index in (train, val, test))


class _Unstratifiable(ValueError):
    """A class too small for a stratified split (fewer than 2 rows, or fewer rows than classes on a side)."""


def shuffle_split(
    n: int, fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of n rows, `fraction` of them (rounded up) in test, drawn from
    np.random.RandomState(seed); with labels, each class in proportion. The very rows that
    scikit-learn's train_test_split(range(n), test_size=fraction, random_state=seed, stratify=labels)
    gives (its ShuffleSplit and StratifiedShuffleSplit, draw for draw: tests/unit/test_split.py checks
    them against it), so a run splits as it did when danlu called scikit-learn, without the 1.5 s that
    importing it adds to every training process's start."""
    n_test = math.ceil(fraction * n)
    n_train = n - n_test
    if not 0 < fraction < 1 or n_train <= 0:
        raise ValueError(f"a split of {fraction:g} of {n} rows leaves no training rows")
    rng = np.random.RandomState(seed)
    if labels is None:
        permutation = rng.permutation(n)
        return permutation[n_test:], permutation[:n_test]
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(counts):
        raise _Unstratifiable(f"{len(counts)} classes, the smallest of {counts.min()} rows")
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    train_counts = _approximate_mode(counts, n_train, rng)
    test_counts = _approximate_mode(counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for rows, n_i, t_i in zip(members, train_counts, test_counts, strict=True):
        drawn = rows.take(rng.permutation(len(rows)), mode="clip")
        train.extend(drawn[:n_i])
        test.extend(drawn[n_i : n_i + t_i])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` rows each class gives: its share rounded down, then one more to the
    classes with the largest remainders (ties broken at random) until they add up to `draws`."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), need)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            need -= now
            if need == 0:
                break
    return floored.astype(int)


def memory_budget(config: DataConfig) -> int:
    """Bytes a data set may take in memory: data.memory_budget_gb, else a quarter of the memory this
    process can still take (in a container, under its limit)."""
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * 2**30)
    return memory_room() // 4
