import numpy as np
import pytest
from sklearn import metrics as skm

from danlu.evaluation.metrics import classification_metrics, regression_metrics, summary


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    proba = rng.dirichlet([1, 1, 1], 500)
    proba[np.arange(500), y] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    m = classification_metrics(y, proba, ["a", "b", "c"])
    pred = proba.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["per_class"]["b"]["support"] == int((y == 1).sum())
    assert set(summary("classification", m)) == {"accuracy", "f1_macro", "roc_auc", "log_loss"}


def test_binary_roc_auc_uses_positive_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), [False, True])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))


def test_roc_auc_is_none_when_a_class_is_absent():
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    assert classification_metrics(np.array([0, 1]), proba, [0, 1, 2])["roc_auc"] is None


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.normal(100, 10, 200)
    pred = y + rng.normal(0, 3, 200)
    m = regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)))
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred))
