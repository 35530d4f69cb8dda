"""train.log_to mlflow: the run in an MLflow tracking store (MLFLOW_TRACKING_URI, else MLflow's default,
a SQLite file in the working directory): the flattened config as params, metrics per epoch at their
epoch, the test metrics, report.json, config.yaml and plots as artifacts, and the model as an MLflow pyfunc
model whose predict is `danlu.load(run).predict`.

RUN/tracking.json names the store, experiment and run, so a resumed run goes on logging into the same
MLflow run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from danlu import __version__
from danlu.errors import DanluError
from danlu.quiet import quiet
from danlu.run import atomic_write_json, read_json
from danlu.tracking import MLFLOW_PARENT, flatten, numbers

DEFAULT_EXPERIMENT = "danlu"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc model MLflow loads (models from code)
_PARAM_BATCH = 100  # MLflow takes at most 100 params per log_batch
_PARAM_CHARS = 6000  # and values of at most 6,000 characters
# a server that goes away mid-run must cost seconds, not MLflow's default of minutes of retries
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return  # a local store (sqlite, a folder) or a managed one with its own client
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        raise DanluError(
            f"cannot reach the MLflow server at {uri} ({error})",
            "start it (`mlflow server`) or set MLFLOW_TRACKING_URI to one that runs",
        ) from None


class MlflowWriter:
    name = "mlflow"

    def __init__(self, config: Any, run: Any, resumed: bool) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        if urlparse(uri).scheme in ("http", "https"):
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        _check_reachable(uri)
        self.client = MlflowClient(uri)
        previous = _previous(run, uri) if resumed else None
        if previous is not None:
            self.run_id = previous
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = _experiment(self.client, config)
        tags = {"danlu.run_dir": str(run.path.resolve())}
        parent = MLFLOW_PARENT.get()
        if parent is not None:  # a search's trial: under its search's run in MLflow's UI
            tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(experiment_id, run_name=run.path.name, tags=tags)
        self.run_id = created.info.run_id
        atomic_write_json(
            run.tracking,
            {"mlflow": {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id}},
        )
        self._log_params(flatten(config.model_dump(mode="json")))

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def epoch(self, record: dict[str, Any], step: int, per_step: list[tuple[int, float, float]]) -> None:
        epoch = int(record["epoch"])
        self._log_metrics({k: v for k, v in numbers(record).items() if k != "epoch"}, epoch)

    def finish(self, config: Any, run: Any, report: dict[str, Any]) -> None:
        test = numbers(report.get("test") or {})
        if test:
            self._log_metrics({f"test_{k}": v for k, v in test.items()}, int(report.get("epochs_run") or 0))
        for path in (run.report, run.config):
            self.client.log_artifact(self.run_id, str(path))
        if run.plots.is_dir() and any(run.plots.iterdir()):
            self.client.log_artifacts(self.run_id, str(run.plots), "plots")
        self._log_model(run)

    def _log_model(self, run: Any) -> None:
        """The run's serving files (as `danlu package` copies them) in an MLflow pyfunc model."""
        import mlflow.pyfunc

        from danlu import families
        from danlu.env.payload import copy_tree, run_files

        family = families.family_of(run.read_preprocess())
        with tempfile.TemporaryDirectory(prefix="danlu-mlflow-") as scratch:
            staged = Path(scratch) / "run"
            copy_tree(run.path, staged, run_files(run, family.serve_files, "torch"), links_may_leave=False)
            model = Path(scratch) / "model"
            with quiet(), _no_progress_bars():  # MLflow's notes on its own internals
                mlflow.pyfunc.save_model(
                    str(model),
                    python_model=str(MODEL_CODE),
                    artifacts={"run": str(staged)},
                    pip_requirements=[f"danlu=={__version__}"],
                )
            self.client.log_artifacts(self.run_id, str(model), "model")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar for each folder it copies; off while danlu copies the run's files."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _experiment(client: Any, config: Any) -> str:
    """The id of the config's MLflow experiment, created when new."""
    name = config.train.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    with quiet():  # a new local store logs its table creation
        experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def start_search_run(config: Any, name: str, space: dict[str, Any]) -> str:
    """A `danlu tune` search's own MLflow run, the parent of its trials' runs; returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    _check_reachable(uri)
    client = MlflowClient(uri)
    run = client.create_run(_experiment(client, config), run_name=name, tags={"danlu.search": name})
    client.log_text(run.info.run_id, json.dumps(space, indent=2), "space.json")
    return run.info.run_id


def end_search_run(run_id: str, result: Any) -> None:
    """The search's best value (at the number of trials so far), best.yaml and plots, and its end."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.get_tracking_uri())
    if result.best is not None:
        client.log_metric(run_id, f"best_{result.monitor}", result.best["value"], step=len(result.trials))
        client.set_tag(run_id, "danlu.best_trial", f"{result.best['number']:03d}")
        client.log_artifact(run_id, str(result.best_config))
        plots = result.out / "plots"
        if plots.is_dir():
            client.log_artifacts(run_id, str(plots), "plots")
    client.set_terminated(run_id, "FINISHED")


def _previous(run: Any, uri: str) -> str | None:
    """The MLflow run a stopped run was logging into, when it is in this store."""
    try:
        record = read_json(run.tracking)["mlflow"]
    except (OSError, DanluError, KeyError, TypeError):  # none, or damaged: a new MLflow run
        return None
    return record.get("run_id") if record.get("tracking_uri") == uri else None
