import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn import metrics as skm

import danlu
from danlu.errors import DanluError
from tests.conftest import mixed_frame, regression_frame

SMALL = ["train.epochs=8", "model.hidden=[16]"]


def test_classification_run_directory_and_predictor(tmp_path, mixed_csv):
    run = danlu.train(
        None,
        [f"data.train={mixed_csv}", "data.target=label", "train.epochs=40", "model.hidden=[16]"],
        out=tmp_path / "run",
        progress=False,
    )
    files = {p.name for p in run.path.iterdir()}
    assert {
        "config.yaml",
        "preprocess.json",
        "model.safetensors",
        "checkpoints",
        "metrics.jsonl",
        "report.json",
        "plots",
    } <= files
    assert {p.name for p in (run.path / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    assert {p.name for p in (run.path / "plots").iterdir()} == {"learning_curves.png", "confusion_matrix.png"}
    report = run.report
    assert report["task"] == "classification" and report["classes"] == ["high", "low", "mid"]
    assert (
        report["train_seconds"] > 0
        and report["rows"]["train"] + report["rows"]["validation"] + report["rows"]["test"] == 400
    )
    assert len(run.metrics) == 40 and all("val_loss" in m for m in run.metrics)
    assert not any(k.startswith("module.") for k in load_file(run.path / "model.safetensors"))

    predictor = danlu.load(run.path)
    frame = mixed_frame(50, seed=9)
    proba = predictor.predict_proba(frame)
    assert proba.shape == (50, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert set(predictor.predict(frame)) <= {"high", "low", "mid"}
    assert list(predictor.predict(frame)) == list(np.array(["high", "low", "mid"])[proba.argmax(axis=1)])
    # the model learned something: well above the 1/3 of guessing
    assert skm.accuracy_score(frame["label"], predictor.predict(frame)) > 0.6


def test_evaluate_recomputes_the_reported_test_metrics(tmp_path, mixed_csv):
    run = danlu.train(
        None, [f"data.train={mixed_csv}", "data.target=label", *SMALL], out=tmp_path / "run", progress=False
    )
    again = danlu.evaluate(run.path)
    for key in ("accuracy", "f1_macro", "log_loss"):
        assert again[key] == pytest.approx(run.report["test"][key], rel=1e-5)


def test_regression_metrics_are_in_original_units(tmp_path, regression_csv):
    run = danlu.train(
        None,
        [f"data.train={regression_csv}", "data.target=price", "train.epochs=60", "model.hidden=[32]"],
        out=tmp_path / "run",
        progress=False,
    )
    assert run.report["task"] == "regression"
    test = pd.read_csv(regression_csv).iloc[:100]
    pred = danlu.load(run.path).predict(test)
    assert abs(pred.mean() - 100) < 10  # original units, not standardized
    assert skm.r2_score(test["price"], pred) > 0.8
    assert (run.path / "plots" / "predicted_vs_actual.png").is_file()


def test_same_seed_same_weights(tmp_path, mixed_csv):
    args = [f"data.train={mixed_csv}", "data.target=label", "train.epochs=3"]
    a = danlu.train(None, args, out=tmp_path / "a", progress=False)
    b = danlu.train(None, args, out=tmp_path / "b", progress=False)
    c = danlu.train(None, [*args, "train.seed=1"], out=tmp_path / "c", progress=False)
    wa, wb, wc = (load_file(r.path / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_onehot_and_custom_models(tmp_path, mixed_csv):
    base = [f"data.train={mixed_csv}", "data.target=label", "train.epochs=2"]
    onehot = danlu.train(None, [*base, "model.categorical=onehot"], out=tmp_path / "onehot", progress=False)
    assert onehot.report["test"]["accuracy"] > 0
    custom = danlu.train(
        None,
        [*base, "model.target=tests.custom_models:WithCategoricals"],
        out=tmp_path / "custom",
        progress=False,
    )
    weights = load_file(custom.path / "model.safetensors")
    assert "head.weight" in weights
    assert danlu.load(custom.path).predict(mixed_frame(5)).shape == (5,)


def test_chunked_training_on_npy_over_budget(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30_000, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    np.save(tmp_path / "big.npy", np.column_stack([x, y]))
    run = danlu.train(
        None,
        [
            f"data.train={tmp_path / 'big.npy'}",
            "data.target=x4",
            "data.task=classification",
            "data.memory_budget_gb=0.0001",
            "data.chunk_rows=4096",
            "train.epochs=3",
            "train.batch_size=256",
        ],
        out=tmp_path / "run",
        progress=False,
    )
    report = run.report
    assert report["in_memory"] is False
    assert sum(report["rows"].values()) == 30_000
    assert report["test"]["accuracy"] > 0.9
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_chunked_and_in_memory_agree_on_preprocessing(tmp_path):
    frame = regression_frame(5000)
    frame.to_parquet(tmp_path / "d.parquet", row_group_size=1000, index=False)
    common = [f"data.train={tmp_path / 'd.parquet'}", "data.target=price", "train.epochs=1"]
    chunked = danlu.train(None, [*common, "data.in_memory=false"], out=tmp_path / "c", progress=False)
    memory = danlu.train(None, [*common, "data.in_memory=true"], out=tmp_path / "m", progress=False)
    assert chunked.report["in_memory"] is False and memory.report["in_memory"] is True
    pc = json.loads((chunked.path / "preprocess.json").read_text())
    # different splits (row masks vs stratified split), same statistics up to sampling
    assert pc["target_mean"] == pytest.approx(100, abs=2)
    assert [c["name"] for c in pc["numeric"]] == ["a", "b", "c"]


def test_existing_run_directory_is_not_clobbered(tmp_path, mixed_csv):
    args = [f"data.train={mixed_csv}", "data.target=label", "train.epochs=1"]
    danlu.train(None, args, out=tmp_path / "run", progress=False)
    with pytest.raises(DanluError, match="already exists"):
        danlu.train(None, args, out=tmp_path / "run", progress=False)
    assert danlu.train(None, args, out=tmp_path / "run", overwrite=True, progress=False).report


def test_failed_setup_leaves_no_run_directory(tmp_path, mixed_csv):
    with pytest.raises(DanluError, match="target column 'nope'"):
        danlu.train(
            None, [f"data.train={mixed_csv}", "data.target=nope"], out=tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run").exists()


def test_separate_validation_and_test_files(tmp_path):
    for name, seed in (("train", 0), ("val", 1), ("test", 2)):
        mixed_frame(300, seed).to_csv(tmp_path / f"{name}.csv", index=False)
    run = danlu.train(
        None,
        [
            f"data.train={tmp_path / 'train.csv'}",
            f"data.validation={tmp_path / 'val.csv'}",
            f"data.test={tmp_path / 'test.csv'}",
            "data.target=label",
            "train.epochs=2",
        ],
        out=tmp_path / "run",
        progress=False,
    )
    assert run.report["rows"] == {"train": 300, "validation": 300, "test": 300}


def test_early_stopping_restores_best(tmp_path, mixed_csv):
    run = danlu.train(
        None,
        [
            f"data.train={mixed_csv}",
            "data.target=label",
            "train.epochs=200",
            "train.patience=3",
            "train.lr=0.05",
            "train.monitor=val_accuracy",
        ],
        out=tmp_path / "run",
        progress=False,
    )
    report = run.report
    assert report["stopped_early"] and report["epochs_run"] < 200
    best = max(m["val_accuracy"] for m in run.metrics)
    assert report["best_epoch"] == next(m["epoch"] for m in run.metrics if m["val_accuracy"] == best)


def test_monitor_must_fit_the_task(tmp_path, regression_csv):
    with pytest.raises(DanluError, match=r"train\.monitor=val_accuracy does not apply to regression"):
        danlu.train(
            None,
            [f"data.train={regression_csv}", "data.target=price", "train.monitor=val_accuracy"],
            out=tmp_path / "run",
            progress=False,
        )
