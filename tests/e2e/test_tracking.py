"""train.log_to: a run tracked in TensorBoard and MLflow, read back with TensorBoard's own reader and
MLflow's client, its MLflow model loaded with mlflow.pyfunc; resumed, and with an MLflow server that
cannot be reached. Under torchrun and Ray Train: tests/e2e/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import mixed_frame, run_cli, train_and_kill, write_config
from tests.e2e.test_distributed import free_port

pytestmark = pytest.mark.slow

EPOCHS = 4


def _config(tmp_path: Path, epochs: int = EPOCHS, extra: str = "") -> Path:
    mixed_frame(600).to_csv(tmp_path / "mixed.csv", index=False)
    return write_config(
        tmp_path / "track.yaml",
        f"data: {{train: mixed.csv, target: label}}\n"
        f"train: {{epochs: {epochs}, batch_size: 32, patience: 0{extra}}}\n",
    )


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return accumulator.Reload()


def _scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    return uri


def test_a_run_is_tracked_in_tensorboard_and_mlflow(tmp_path, mlflow_env):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient
    from tensorboard.plugins.hparams import plugin_data_pb2

    import danlu

    cfg, out = _config(tmp_path), tmp_path / "runs" / "tracked"
    result = run_cli("train", str(cfg), "--out", str(out), "--log-to", "tensorboard,mlflow", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    steps_per_epoch = -(-report["rows"]["train"] // report["batch_size"])

    # TensorBoard: every step's loss and lr, every epoch's metrics at its last step, hparams, plots
    events = _events(out / "tensorboard")
    step_loss = _scalars(events, "step/loss")
    assert [s for s, _ in step_loss] == list(range(1, EPOCHS * steps_per_epoch + 1))
    assert all(np.isfinite(v) and v > 0 for _, v in step_loss)
    epoch_ends = [e * steps_per_epoch for e in range(1, EPOCHS + 1)]
    val_loss = _scalars(events, "val_loss")
    assert [s for s, _ in val_loss] == epoch_ends
    np.testing.assert_allclose([v for _, v in val_loss], [r["val_loss"] for r in history], rtol=1e-6)
    # the epoch's mean training loss is the mean of its steps' losses, weighted by rows
    first_epoch = [v for s, v in step_loss if s <= steps_per_epoch]
    assert min(first_epoch) <= history[0]["train_loss"] <= max(first_epoch)
    lrs = [v for _, v in _scalars(events, "step/lr")]
    assert lrs[0] > lrs[-1]  # the cosine schedule, step by step
    test_accuracy = _scalars(events, "test/accuracy")
    assert test_accuracy[0][1] == pytest.approx(report["test"]["accuracy"], rel=1e-6)
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    names = {h.name for h in experiment.experiment.hparam_infos}
    assert {"train.lr", "train.epochs", "data.target", "model.hidden"} <= names
    assert {m.name.tag for m in experiment.experiment.metric_infos} >= {"test/accuracy", "test/f1_macro"}
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.epochs"].number_value == EPOCHS
    images = set(events.Tags()["images"])
    assert {"plots/learning_curves", "plots/confusion_matrix"} <= images

    # MLflow: params, metrics per epoch at their epoch, artifacts, and the model as a pyfunc
    tracked = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert tracked["tracking_uri"] == mlflow_env
    client = MlflowClient(mlflow_env)
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "tracking-test"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["data.target"] == "label"
    assert run.data.tags["danlu.run_dir"] == str(out.resolve())
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted((m.step, m.value) for m in val) == [(r["epoch"], r["val_loss"]) for r in history]
    assert run.data.metrics["test_accuracy"] == pytest.approx(report["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "config.yaml", "plots", "model"} <= artifacts
    rows = pd.read_parquet(out / "heldout.parquet").drop(columns=["label"])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    expected = danlu.load(out).predict(rows)
    assert len(set(expected)) > 1  # the rows are not all one class: the comparison means something
    np.testing.assert_array_equal(np.asarray(model.predict(rows)), expected)


def test_a_resumed_run_goes_on_in_the_same_tensorboard_steps_and_mlflow_run(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    cfg, out = _config(tmp_path, epochs=30, extra=", log_to: [tensorboard, mlflow]"), tmp_path / "run"
    train_and_kill(cfg, out, 3)
    first_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    result = run_cli("train", "--resume", str(out), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    steps_per_epoch = -(-report["rows"]["train"] // report["batch_size"])
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == first_id
    # the killed attempt's steps after its checkpoint are purged: each step once, in order
    steps = [s for s, _ in _scalars(_events(out / "tensorboard"), "step/loss")]
    assert steps == list(range(1, 30 * steps_per_epoch + 1))
    run = MlflowClient(mlflow_env).get_run(first_id)
    assert run.info.status == "FINISHED"
    epochs = {m.step for m in MlflowClient(mlflow_env).get_metric_history(first_id, "val_loss")}
    assert epochs == set(range(1, 31))


def test_an_unreachable_mlflow_server_is_a_warning_and_the_run_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    cfg, out = _config(tmp_path, epochs=2), tmp_path / "run"
    result = run_cli("train", str(cfg), "--out", str(out), "--log-to", "mlflow,tensorboard", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "mlflow tracking is off" in line]
    assert len(warnings) == 1 and "cannot reach the MLflow server" in warnings[0], result.stderr
    assert (out / "report.json").is_file() and not (out / "tracking.json").exists()
    assert _scalars(_events(out / "tensorboard"), "val_loss")  # the other tracker carried on


def test_log_to_names_what_it_takes(tmp_path):
    cfg = _config(tmp_path, epochs=1)
    result = run_cli("train", str(cfg), "--log-to", "wandb", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "danlu: error: --log-to wandb: unknown tracker wandb "
        "(fix: use tensorboard, mlflow or tensorboard,mlflow)"
    ]
    result = run_cli("train", str(cfg), "train.log_to=[neptune]", cwd=tmp_path)
    assert result.returncode == 2 and "train.log_to.0" in result.stderr
