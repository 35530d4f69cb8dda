import json

import numpy as np
import pytest
from sklearn import metrics as skm

from danlu.evaluation.metrics import MetricStream, summary


def metrics_of(task, y, decoded, classes=None, chunk=None, exact_rows=1_000_000):
    stream = MetricStream(task, classes, exact_rows=exact_rows)
    chunk = chunk or len(y)
    for start in range(0, len(y), chunk):
        stream.update(y[start : start + chunk], decoded[start : start + chunk])
    return stream.result()


def multiclass_scores(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    proba = rng.dirichlet([1, 1, 1], n)
    proba[np.arange(n), y] += 0.5
    return y, proba / proba.sum(axis=1, keepdims=True)


def test_multiclass_metrics_match_sklearn():
    y, proba = multiclass_scores(500)
    m = metrics_of("classification", y, proba, ["a", "b", "c"])
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


def test_chunked_metrics_equal_one_shot_metrics():
    y, proba = multiclass_scores(1000, seed=3)
    whole = metrics_of("classification", y, proba, ["a", "b", "c"])
    chunked = metrics_of("classification", y, proba, ["a", "b", "c"], chunk=77)
    assert chunked["confusion_matrix"] == whole["confusion_matrix"]
    for key in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_histogram_roc_auc_past_exact_rows_is_close_to_exact(k):
    rng = np.random.default_rng(k)
    n = 20_000
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    exact = metrics_of("classification", y, proba, list(range(k)))
    streamed = metrics_of("classification", y, proba, list(range(k)), chunk=1000, exact_rows=3000)
    assert streamed["roc_auc"] != exact["roc_auc"]  # the histogram path really ran
    assert streamed["roc_auc"] == pytest.approx(exact["roc_auc"], abs=1e-4)
    assert streamed["confusion_matrix"] == exact["confusion_matrix"]
    assert streamed["log_loss"] == pytest.approx(exact["log_loss"], rel=1e-9)


def test_binary_roc_auc_uses_positive_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    m = metrics_of("classification", y, np.stack([1 - p1, p1], axis=1), [False, True])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_roc_auc_equals_sklearns_with_tied_scores(k):
    """Scores rounded to one decimal: most rows tie with others, within and across the classes."""
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 400)
    proba = rng.dirichlet(np.ones(k), 400)
    proba[np.arange(400), y] += 0.3
    proba = np.round(proba / proba.sum(axis=1, keepdims=True), 1)
    m = metrics_of("classification", y, proba, list(range(k)))
    if k == 2:
        expected = skm.roc_auc_score(y, proba[:, 1])
    else:  # sklearn's check that the scores sum to 1 would refuse the rounded ones: its mean of columns
        expected = np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in range(k)])
    assert m["roc_auc"] == pytest.approx(expected, rel=1e-12)
    nan = proba.copy()
    nan[0, 0] = np.nan
    undefined = metrics_of("classification", y, nan, list(range(k)))
    assert undefined["roc_auc"] is None and "NaN" in undefined["undefined"]["roc_auc"]


@pytest.mark.parametrize("exact_rows", [1_000_000, 1])
def test_roc_auc_is_none_when_a_class_is_absent(exact_rows):
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    m = metrics_of("classification", np.array([0, 1]), proba, [0, 1, 2], chunk=1, exact_rows=exact_rows)
    assert m["roc_auc"] is None


def test_regression_metrics_match_sklearn_in_chunks_with_a_large_offset():
    rng = np.random.default_rng(1)
    y = rng.normal(1e6, 10, 2000)
    pred = y + rng.normal(0, 3, 2000)
    m = metrics_of("regression", y, pred, chunk=300)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)))
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-6)


@pytest.mark.parametrize("y", [[3.0], [2.0, 2.0, 2.0]])
def test_an_undefined_r2_is_none_with_a_reason_never_nan(y):
    m = metrics_of("regression", np.array(y), np.array(y) + 1)
    assert m["r2"] is None and "at least 2 rows with different true values" in m["undefined"]["r2"]
    assert m["mae"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)  # strict JSON


def test_an_undefined_roc_auc_says_why():
    m = metrics_of("classification", np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), [0, 1])
    assert m["roc_auc"] is None and "single class" in m["undefined"]["roc_auc"]
    assert m["accuracy"] == 1.0


def test_sample_keeps_the_first_rows_only():
    stream = MetricStream("regression", None, exact_rows=250)
    for start in range(0, 1000, 100):
        values = np.arange(start, start + 100, dtype=float)
        stream.update(values, values)
    y, _ = stream.sample
    assert stream.n == 1000
    assert len(y) == 300 and y[0] == 0
