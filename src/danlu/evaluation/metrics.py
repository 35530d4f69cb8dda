"""Metrics as pure functions on arrays, and `MetricStream`, which computes the same metrics over chunks
of a split in bounded memory."""

from __future__ import annotations

from typing import Any

import numpy as np

SUMMARY_KEYS = {
    "classification": ("accuracy", "f1_macro", "roc_auc", "log_loss"),
    "regression": ("mae", "rmse", "r2"),
    "generation": ("loss", "perplexity"),  # per trained token (danlu.training.objectives.TokenStream)
}
EXACT_ROWS = 1_000_000  # MetricStream keeps scores for an exact ROC-AUC up to this many rows
PROBA_FLOOR = 1e-15  # log loss clips probabilities here


def _roc_auc(y: np.ndarray, proba: np.ndarray) -> tuple[float | None, str | None]:
    """ROC-AUC (binary: of the second class's score; more classes: the mean of each class's one-vs-rest
    AUC), or None with the reason it is undefined for these rows."""
    present = len(np.unique(y))
    if present < 2:
        return None, "undefined: the true labels hold a single class"
    if proba.shape[1] > 2 and present < proba.shape[1]:
        return None, "undefined: one-vs-rest needs every class among the true labels"
    if not np.isfinite(proba).all():
        return None, "undefined: the predicted probabilities hold NaN or infinity"
    columns = [1] if proba.shape[1] == 2 else range(proba.shape[1])
    return float(np.mean([_binary_auc(y == c, proba[:, c]) for c in columns])), None


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """The area under the ROC curve, exactly: the rows counted per distinct score, then as the
    histograms' AUC (`_auc_of_counts`). Equal to scikit-learn's roc_auc_score
    (tests/unit/test_metrics.py), without importing it (1.5 s)."""
    _, bins = np.unique(score, return_inverse=True)
    positives = np.bincount(bins, weights=positive)
    negatives = np.bincount(bins, weights=~positive)
    return _auc_of_counts(negatives, positives)


def _auc_of_counts(negatives: np.ndarray, positives: np.ndarray) -> float:
    """The chance that a positive row scores above a negative one, ties counted half, from the rows'
    counts per score bin in increasing order (Mann-Whitney U)."""
    below = np.cumsum(negatives) - negatives
    return float((positives * (below + 0.5 * negatives)).sum() / (positives.sum() * negatives.sum()))


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)


def _log_loss_sum(y: np.ndarray, proba: np.ndarray) -> float:
    p_true = proba[np.arange(len(y)), y.astype(np.int64)].astype(np.float64)
    return float(-np.log(np.clip(p_true, PROBA_FLOOR, 1.0)).sum())


def _from_confusion(
    confusion: np.ndarray, classes: list[Any], roc_auc: float | None, log_loss: float | None
) -> dict[str, Any]:
    """The classification report from a confusion matrix (rows true, columns predicted)."""
    true_positive = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(true_positive.sum() / max(confusion.sum(), 1)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": roc_auc,
        "log_loss": log_loss,
        "per_class": {
            str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion.tolist(),
    }


def summary(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics (the keys `danlu evaluate --json` prints)."""
    return {key: metrics[key] for key in SUMMARY_KEYS[task]}


class _ScoreHistograms:
    """One-vs-rest ROC-AUC from per-class score histograms on the logit scale.

    Pairs of a positive and a negative row in different bins are ranked exactly; pairs sharing a bin count
    as ties (half), which is the whole of the approximation. Bins are 0.001 logits wide for up to 16 classes.
    """

    LOGIT_RANGE = 30.0

    def __init__(self, k: int) -> None:
        self.k = k
        self.columns = [1] if k == 2 else list(range(k))
        self.bins = int(np.clip((1 << 22) // len(self.columns), 1024, 1 << 16))
        self.counts = np.zeros((len(self.columns), 2, self.bins), dtype=np.int64)

    def update(self, y: np.ndarray, proba: np.ndarray) -> None:
        for row, c in enumerate(self.columns):
            p = np.clip(proba[:, c].astype(np.float64), 1e-300, 1.0)
            logit = np.clip(
                np.log(p) - np.log1p(-np.minimum(p, 1 - 1e-16)), -self.LOGIT_RANGE, self.LOGIT_RANGE
            )
            index = (
                ((logit + self.LOGIT_RANGE) / (2 * self.LOGIT_RANGE) * (self.bins - 1))
                .round()
                .astype(np.int64)
            )
            positive = (y == c).astype(np.int64)
            self.counts[row] += np.bincount(positive * self.bins + index, minlength=2 * self.bins).reshape(
                2, self.bins
            )

    def roc_auc(self) -> tuple[float | None, str | None]:
        aucs = []
        for negatives, positives in self.counts:
            n_pos, n_neg = positives.sum(), negatives.sum()
            if n_pos == 0 or n_neg == 0:  # the same rule as the exact path: every class must be present
                return None, "undefined: one-vs-rest needs every class among the true labels"
            aucs.append(_auc_of_counts(negatives, positives))
        return float(np.mean(aucs)), None


class MetricStream:
    """The metrics of a split, fed chunk by chunk, in memory bounded by `exact_rows`.

    Confusion matrix, log loss, MAE, RMSE and R^2 are exact for any number of rows (running sums).
    ROC-AUC is exact (ranks) up to `exact_rows` rows; past that it comes from `_ScoreHistograms`.
    The first `exact_rows` rows stay available as `sample` (for plots).
    """

    def __init__(self, task: str, classes: list[Any] | None, exact_rows: int = EXACT_ROWS) -> None:
        self.task, self.classes, self.exact_rows = task, classes, exact_rows
        self.n = 0
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []
        self._kept_rows = 0
        self._histograms: _ScoreHistograms | None = None
        if task == "classification":
            self._confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
            self._log_loss = 0.0
        else:
            self._shift: float | None = None  # sums of (y - shift) keep R^2 precise for large offsets
            self._sums = np.zeros(4)  # |e|, e^2, y - shift, (y - shift)^2

    def update(self, y: np.ndarray, decoded: np.ndarray) -> None:
        """Add rows: true targets (class indices or values) and decoded predictions."""
        if len(y) == 0:
            return
        self.n += len(y)
        if self.task == "classification":
            self._confusion += _confusion(y, decoded.argmax(axis=1), len(self.classes))
            self._log_loss += _log_loss_sum(y, decoded)
        else:
            y64, error = y.astype(np.float64), decoded.astype(np.float64) - y
            if self._shift is None:
                self._shift = float(y64.mean())
            centred = y64 - self._shift
            self._sums += (np.abs(error).sum(), (error**2).sum(), centred.sum(), (centred**2).sum())
        kept = self._kept_rows < self.exact_rows
        if kept:
            self._kept.append((y, decoded))
            self._kept_rows += len(y)
        if self.task == "classification" and self.n > self.exact_rows:
            pending = [(y, decoded)]
            if self._histograms is None:  # switching over: fold in every row seen so far
                self._histograms = _ScoreHistograms(len(self.classes))
                pending = self._kept if kept else [*self._kept, (y, decoded)]
            for pending_y, pending_decoded in pending:
                self._histograms.update(pending_y, pending_decoded)

    @property
    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(targets, decoded predictions) of the first rows, at least `exact_rows` of them when there are."""
        if not self._kept:
            return np.empty(0), np.empty(0)
        return np.concatenate([y for y, _ in self._kept]), np.concatenate([d for _, d in self._kept])

    def result(self) -> dict[str, Any]:
        """The full metrics. A metric that these rows leave undefined is None, and `undefined` maps its
        name to the reason (the key is present only then)."""
        undefined: dict[str, str] = {}
        if self.task == "classification":
            if self._histograms is not None:
                roc_auc, reason = self._histograms.roc_auc()
            else:
                roc_auc, reason = _roc_auc(*self.sample) if self.n else (None, "undefined: no rows")
            if reason:
                undefined["roc_auc"] = reason
            log_loss = self._log_loss / self.n if self.n else None
            metrics = _from_confusion(self._confusion, self.classes, roc_auc, log_loss)
        else:
            metrics = self._regression(undefined)
        if undefined:
            metrics["undefined"] = undefined
        return metrics

    def _regression(self, undefined: dict[str, str]) -> dict[str, Any]:
        abs_sum, sq_sum, c_sum, c_sq_sum = self._sums
        if self.n == 0:
            undefined.update(dict.fromkeys(SUMMARY_KEYS["regression"], "undefined: no rows"))
            return dict.fromkeys(SUMMARY_KEYS["regression"])
        total = c_sq_sum - c_sum**2 / self.n
        r2 = None
        if self.n < 2 or total <= 0:
            undefined["r2"] = "undefined: needs at least 2 rows with different true values"
        else:
            r2 = float(1 - sq_sum / total)
        return {"mae": float(abs_sum / self.n), "rmse": float(np.sqrt(sq_sum / self.n)), "r2": r2}

    def epoch_result(self) -> dict[str, float | None]:
        """The cheap per-epoch validation metrics (None where undefined)."""
        if self.task == "classification":
            full = _from_confusion(self._confusion, self.classes, None, 0.0)
            return {"accuracy": full["accuracy"], "f1_macro": full["f1_macro"]}
        return self._regression({})
