"""danlu's own train/validation/test split draws the very rows scikit-learn's train_test_split drew when
danlu called it (plain and stratified, ties between classes broken by the same draws), so a run splits
as it did before, and no training process imports scikit-learn to split."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from danlu.config import DataConfig
from danlu.data.split import shuffle_split, split_indices
from tests.conftest import train_in_a_fresh_interpreter


def sklearn_split_indices(n: int, labels: pd.Series | None, config: DataConfig):
    """split_indices as danlu wrote it over scikit-learn (the reference)."""
    if labels is not None and (not config.stratify or labels.isna().any()):
        labels = None
    if labels is not None:
        labels = pd.Series(pd.factorize(labels, sort=True)[0])

    def split(index, fraction, seed):
        if fraction == 0:
            return index, index[:0]
        try:
            by = labels.iloc[index] if labels is not None else None
            return train_test_split(index, test_size=fraction, random_state=seed, stratify=by)
        except ValueError:
            return train_test_split(index, test_size=fraction, random_state=seed)

    seed, val, test = config.split_seed, config.val_fraction, config.test_fraction
    rest, test_rows = split(np.arange(n), test, seed)
    train, val_rows = split(rest, val / (1 - test), seed + 1)
    return tuple(np.sort(index) for index in (train, val_rows, test_rows))


LAYOUTS = {
    "none": lambda n, rng: None,
    "two balanced": lambda n, rng: pd.Series(np.arange(n) % 2),
    "three skewed": lambda n, rng: pd.Series(rng.choice(["a", "b", "c"], size=n, p=[0.7, 0.2, 0.1])),
    "tied counts": lambda n, rng: pd.Series(np.arange(n) % 7),  # remainders tie: broken at random
    "one singleton": lambda n, rng: pd.Series(["rare"] + ["x", "y"] * ((n - 1) // 2) + ["x"] * ((n - 1) % 2)),
    "many classes": lambda n, rng: pd.Series(np.arange(n) // 2),  # more classes than test rows
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [5, 10, 37, 100, 1001])
def test_the_split_is_scikit_learns_row_for_row(layout, n):
    rng = np.random.default_rng(n)
    labels = LAYOUTS[layout](n, rng)
    for seed in (0, 1, 42):
        for val, test in ((0.1, 0.1), (0.2, 0.0), (0.15, 0.25), (0.0, 0.3), (0.33, 0.33)):
            config = DataConfig(train="x.csv", split_seed=seed, val_fraction=val, test_fraction=test)
            ours, theirs = split_indices(n, labels, config), sklearn_split_indices(n, labels, config)
            for a, b in zip(ours, theirs, strict=True):
                assert np.array_equal(a, b), (layout, n, seed, val, test)
            assert sum(len(part) for part in ours) == n


def test_shuffle_split_refuses_a_split_that_leaves_no_training_rows():
    with pytest.raises(ValueError, match="leaves no training rows"):
        shuffle_split(1, 0.5, 0)
    train, test = shuffle_split(2, 0.5, 0)
    assert len(train) == len(test) == 1


def test_training_imports_no_scikit_learn(tmp_path):
    """A table trains (stratified split, ROC-AUC, plots) in a fresh process without scikit-learn (and its
    plots without pyplot: test_plots.py)."""
    imported = "'sklearn' in sys.modules, 'matplotlib.pyplot' in sys.modules"
    after = f"print(run.report['test']['roc_auc'] > 0.5, {imported})"
    assert train_in_a_fresh_interpreter(tmp_path, "", after) == "True False False"
