"""Metrics as pure functions on arrays, wrapping sklearn.metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

SUMMARY_KEYS = {
    "classification": ("accuracy", "f1_macro", "roc_auc", "log_loss"),
    "regression": ("mae", "rmse", "r2"),
}


def _roc_auc(y: np.ndarray, proba: np.ndarray) -> float | None:
    labels = np.arange(proba.shape[1])
    if len(np.unique(y)) < 2:
        return None  # undefined with one class present
    try:
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y, proba[:, 1]))
        if len(np.unique(y)) < proba.shape[1]:
            return None  # one-vs-rest needs every class present
        return float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels))
    except ValueError:
        return None


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: list[Any]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, ROC-AUC, log loss, per-class report and confusion matrix.

    Args:
        y: true class indices [n]. proba: predicted probabilities [n, k]. classes: the k class names.
    """
    labels = np.arange(len(classes))
    pred = proba.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": _roc_auc(y, proba),
        "log_loss": float(skm.log_loss(y, np.clip(proba, 1e-15, 1), labels=labels)),
        "per_class": {
            str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2, in the units of the values given (original units in danlu)."""
    return {
        "mae": float(skm.mean_absolute_error(y, pred)),
        "rmse": float(np.sqrt(skm.mean_squared_error(y, pred))),
        "r2": float(skm.r2_score(y, pred)) if len(y) > 1 else float("nan"),
    }


def task_metrics(task: str, y: np.ndarray, decoded: np.ndarray, classes: list[Any] | None) -> dict[str, Any]:
    """Metrics for a task from true targets and decoded predictions (probabilities or values)."""
    if task == "classification":
        return classification_metrics(y, decoded, classes)
    return regression_metrics(y, decoded)


def summary(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics (the keys `danlu evaluate --json` prints)."""
    return {key: metrics[key] for key in SUMMARY_KEYS[task]}


def epoch_metrics(task: str, y: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Cheap per-epoch validation metrics (no per-class report)."""
    if task == "classification":
        pred = decoded.argmax(axis=1)
        return {
            "accuracy": float((pred == y).mean()),
            "f1_macro": float(
                skm.f1_score(y, pred, average="macro", labels=np.arange(decoded.shape[1]), zero_division=0)
            ),
        }
    return regression_metrics(y, decoded)
