import itertools
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


def fit(out, data, target="label", *overrides, overwrite=False):
    """Train on a data file with overrides into `out`, quietly."""
    args = [f"data.train={data}", f"data.target={target}", *overrides]
    return danlu.train(None, args, out=out, overwrite=overwrite, progress=False)


def weights_of(run) -> torch.Tensor:
    return torch.cat([t.flatten() for t in load_file(run.path / "model.safetensors").values()])


def test_classification_run_directory_and_predictor(tmp_path, mixed_csv):
    run = fit(tmp_path / "run", mixed_csv, "label", "train.epochs=40", "model.hidden=[16]")
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
    run = fit(tmp_path / "run", mixed_csv, "label", "train.epochs=8", "model.hidden=[16]")
    again = danlu.evaluate(run.path)
    for key in ("accuracy", "f1_macro", "log_loss"):
        assert again[key] == pytest.approx(run.report["test"][key], rel=1e-5)


def test_regression_metrics_are_in_original_units(tmp_path, regression_csv):
    run = fit(tmp_path / "run", regression_csv, "price", "train.epochs=60", "model.hidden=[32]")
    assert run.report["task"] == "regression"
    test = pd.read_csv(regression_csv).iloc[:100]
    pred = danlu.load(run.path).predict(test)
    assert abs(pred.mean() - 100) < 10  # original units, not standardized
    assert skm.r2_score(test["price"], pred) > 0.8
    assert (run.path / "plots" / "predicted_vs_actual.png").is_file()


def test_same_seed_same_weights(tmp_path, mixed_csv):
    a = fit(tmp_path / "a", mixed_csv, "label", "train.epochs=3")
    b = fit(tmp_path / "b", mixed_csv, "label", "train.epochs=3")
    c = fit(tmp_path / "c", mixed_csv, "label", "train.epochs=3", "train.seed=1")
    wa, wb, wc = (load_file(r.path / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_onehot_and_custom_models(tmp_path, mixed_csv):
    onehot = fit(
        tmp_path / "onehot",
        mixed_csv,
        "label",
        "train.epochs=30",
        "model.categorical=onehot",
        "model.hidden=[16]",
    )
    first = load_file(onehot.path / "model.safetensors")["layers.0.weight"]
    assert first.shape == (16, 3 + 4)  # x0, x1, x1's missing indicator, then 4 one-hot columns (3 + unknown)
    assert onehot.report["test"]["accuracy"] > 0.6  # well above the 1/3 of guessing
    custom = fit(
        tmp_path / "custom",
        mixed_csv,
        "label",
        "train.epochs=2",
        "model.target=tests.custom_models:WithCategoricals",
    )
    weights = load_file(custom.path / "model.safetensors")
    assert "head.weight" in weights
    assert danlu.load(custom.path, trust_model_code=True).predict(mixed_frame(5)).shape == (5,)


def test_feature_subset(tmp_path, mixed_csv):
    run = fit(tmp_path / "run", mixed_csv, "label", "train.epochs=2", "data.features=[x0,color]")
    pre = json.loads((run.path / "preprocess.json").read_text())
    assert [c["name"] for c in pre["numeric"]] == ["x0"] and [c["name"] for c in pre["categorical"]] == [
        "color"
    ]
    # a frame without the unused column predicts
    assert danlu.load(run.path).predict(mixed_frame(5).drop(columns=["x1"])).shape == (5,)


def test_grad_clip_bounds_every_step(tmp_path, mixed_csv):
    # Plain SGD moves each step by lr * gradient, so with clipping at c the weights can drift at most
    # steps * lr * c from where an almost-zero learning rate leaves them (the same initialisation).
    sgd = [
        "train.epochs=1",
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.weight_decay=0",
        "train.schedule=none",
        "model.dropout=0",
        "train.batch_size=32",
    ]
    still = fit(tmp_path / "still", mixed_csv, "label", *sgd, "train.lr=1e-12")
    clipped = fit(tmp_path / "clipped", mixed_csv, "label", *sgd, "train.lr=1", "train.grad_clip=1e-6")
    free = fit(tmp_path / "free", mixed_csv, "label", *sgd, "train.lr=1")
    steps = -(-clipped.report["rows"]["train"] // 32)
    assert torch.linalg.norm(weights_of(clipped) - weights_of(still)) <= steps * 1e-6 * 1.01
    assert torch.linalg.norm(weights_of(free) - weights_of(still)) > 1e-2


@pytest.mark.parametrize(
    ("optimizer", "schedule"), [("sgd", "none"), ("adam", "cosine"), ("adamw", "onecycle")]
)
def test_optimizer_and_schedule_drive_the_loop(tmp_path, mixed_csv, optimizer, schedule):
    run = fit(
        tmp_path / "run",
        mixed_csv,
        "label",
        "train.epochs=10",
        "train.lr=0.01",
        f"train.optimizer={optimizer}",
        f"train.schedule={schedule}",
    )
    lrs = [m["lr"] for m in run.metrics]
    if schedule == "none":
        assert lrs == [0.01] * 10
    elif schedule == "cosine":
        assert all(a > b for a, b in itertools.pairwise(lrs)) and lrs[-1] == pytest.approx(0, abs=1e-4)
    else:  # one-cycle: warm up to the peak, then anneal far below the start
        peak = lrs.index(max(lrs))
        assert 0 < peak < 9 and lrs[-1] < lrs[0] / 10
    group = torch.load(run.path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"][
        0
    ]
    assert ("momentum" in group) == (optimizer == "sgd")
    assert ("betas" in group) == (optimizer != "sgd")


def test_chunked_training_on_npy_over_budget(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30_000, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    np.save(tmp_path / "big.npy", np.column_stack([x, y]))
    run = fit(
        tmp_path / "run",
        tmp_path / "big.npy",
        "x4",
        "data.task=classification",
        "data.memory_budget_gb=0.0001",
        "data.chunk_rows=4096",
        "train.epochs=3",
        "train.batch_size=256",
    )
    report = run.report
    assert report["in_memory"] is False
    assert sum(report["rows"].values()) == 30_000
    assert report["test"]["accuracy"] > 0.9
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_chunked_and_in_memory_agree_on_preprocessing(tmp_path):
    frame = regression_frame(5000)
    frame["a"] += 1e7  # a large offset: chunk-by-chunk statistics must still match the in-memory ones
    frame.to_parquet(tmp_path / "d.parquet", row_group_size=1000, index=False)
    whole = ("train.epochs=1", "data.val_fraction=0", "data.test_fraction=0")  # the same training rows
    chunked = fit(tmp_path / "c", tmp_path / "d.parquet", "price", *whole, "data.in_memory=false")
    memory = fit(tmp_path / "m", tmp_path / "d.parquet", "price", *whole, "data.in_memory=true")
    assert chunked.report["in_memory"] is False and memory.report["in_memory"] is True
    pc, pm = (json.loads((run.path / "preprocess.json").read_text()) for run in (chunked, memory))
    assert [c["name"] for c in pc["numeric"]] == [c["name"] for c in pm["numeric"]] == ["a", "b", "c"]
    for c, m in zip(pc["numeric"], pm["numeric"], strict=True):
        assert c["mean"] == pytest.approx(m["mean"], rel=1e-12, abs=1e-12)
        assert c["std"] == pytest.approx(m["std"], rel=1e-9)
    assert pc["numeric"][0]["std"] == pytest.approx(frame["a"].std(ddof=0), rel=1e-9)
    assert pc["target_mean"] == pytest.approx(pm["target_mean"], rel=1e-12)
    assert pc["target_std"] == pytest.approx(pm["target_std"], rel=1e-9)


def test_existing_run_directory_is_not_clobbered(tmp_path, mixed_csv):
    fit(tmp_path / "run", mixed_csv, "label", "train.epochs=1")
    with pytest.raises(DanluError, match="already exists"):
        fit(tmp_path / "run", mixed_csv, "label", "train.epochs=1")
    assert fit(tmp_path / "run", mixed_csv, "label", "train.epochs=1", overwrite=True).report


def test_failed_setup_leaves_no_run_directory(tmp_path, mixed_csv):
    with pytest.raises(DanluError, match="target column 'nope'"):
        fit(tmp_path / "run", mixed_csv, "nope")
    assert not (tmp_path / "run").exists()


def test_resume_takes_no_config(tmp_path, mixed_csv):
    run = fit(tmp_path / "run", mixed_csv, "label", "train.epochs=1")
    with pytest.raises(DanluError, match="resume takes no config"):
        danlu.train(None, ["train.epochs=5"], resume=run.path, progress=False)


def test_separate_validation_and_test_files(tmp_path):
    for name, seed in (("train", 0), ("val", 1), ("test", 2)):
        mixed_frame(300, seed).to_csv(tmp_path / f"{name}.csv", index=False)
    run = fit(
        tmp_path / "run",
        tmp_path / "train.csv",
        "label",
        f"data.validation={tmp_path / 'val.csv'}",
        f"data.test={tmp_path / 'test.csv'}",
        "train.epochs=2",
    )
    assert run.report["rows"] == {"train": 300, "validation": 300, "test": 300}


def test_early_stopping_restores_best(tmp_path, mixed_csv):
    run = fit(
        tmp_path / "run",
        mixed_csv,
        "label",
        "train.epochs=200",
        "train.patience=3",
        "train.lr=0.05",
        "train.monitor=val_accuracy",
    )
    report = run.report
    assert report["stopped_early"] and report["epochs_run"] < 200
    best = max(m["val_accuracy"] for m in run.metrics)
    assert report["best_epoch"] == next(m["epoch"] for m in run.metrics if m["val_accuracy"] == best)
    assert report["best_epoch"] < report["epochs_run"]
    # the run ends with the best epoch's weights, not the last epoch's
    saved = load_file(run.path / "model.safetensors")
    best_state = torch.load(run.path / "checkpoints" / "best.pt", weights_only=True)["model"]
    last_state = torch.load(run.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], best_state[k]) for k in saved)
    assert not all(torch.equal(saved[k], last_state[k]) for k in saved)
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_monitor_must_fit_the_task(tmp_path, regression_csv):
    with pytest.raises(DanluError, match=r"train\.monitor=val_accuracy does not apply to regression"):
        fit(tmp_path / "run", regression_csv, "price", "train.monitor=val_accuracy")


def test_parquet_shards_train_evaluate_and_predict_as_one_table(tmp_path, mixed_csv):
    """A folder of Parquet shards (as the Hugging Face hub writes a split) trains as a table, not as
    images; a pattern of them evaluates and predicts."""
    frame = pd.read_csv(mixed_csv)
    folder = tmp_path / "data"
    folder.mkdir()
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(folder / "train-00000-of-00002.parquet", index=False)
    frame.iloc[half:].to_parquet(folder / "train-00001-of-00002.parquet", index=False)
    run = fit(tmp_path / "run", folder, "label", "train.epochs=3", "model.hidden=[8]")
    assert run.config.data.family == "tabular" and sum(run.report["rows"].values()) == len(frame)
    pattern = folder / "train-*.parquet"
    assert danlu.evaluate(run.path, pattern)["accuracy"] == pytest.approx(
        danlu.evaluate(run.path, mixed_csv)["accuracy"]
    )
    assert danlu.predict_file(run.path, pattern, tmp_path / "p.csv") == len(frame)
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(
        run.report["test"]["accuracy"]
    )  # held-out rows reread
