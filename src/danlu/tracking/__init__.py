"""Experiment tracking (train.log_to): a run's loss and learning rate per step, metrics per epoch, config,
test metrics, plots and model, in TensorBoard's event files (RUN/tensorboard/) and in an MLflow run.

Only rank 0 tracks. Tracking never costs a run: a writer that fails (a full disk, an MLflow server that
went away) is dropped with one warning and training goes on."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from danlu.errors import DanluError, one_line

log = logging.getLogger("danlu")

# what each train.log_to value imports, and the extra that installs it
NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# the MLflow run a `danlu tune` trial belongs to (its search's): set around the trial's danlu.train
MLFLOW_PARENT: ContextVar[str | None] = ContextVar("danlu_mlflow_parent", default=None)


class Stopped(BaseException):
    """A run stopped on purpose (a pruned search trial), not failed: its trackers end it as killed."""


def end_status(error: BaseException | None) -> str:
    """How trackers end a run: FINISHED, KILLED (stopped: Ctrl-C, a pruned trial) or FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, Stopped)) else "FAILED"


def check_installed(names: Iterable[str]) -> None:
    """One line naming the missing package of a train.log_to value (before anything is trained)."""
    for name in names:
        if importlib.util.find_spec(NEEDS[name]) is None:
            raise DanluError(
                f"train.log_to={name} needs the {NEEDS[name]} package, which is not installed",
                "pip install 'danlu[track]'",
            )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: value}; lists and None as their JSON text (what trackers store)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, list):
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (bools and strings left out)."""
    return {
        k: v
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Trackers:
    """The run's writers, each called through `_each` so that one failing drops only itself."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    def __bool__(self) -> bool:
        return bool(self.writers)

    def _each(self, method: str, *args: Any) -> None:
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as error:  # tracking must never end a run
                log.warning(
                    "%s tracking failed (%s); training goes on without it", writer.name, one_line(error)
                )
                self.writers.remove(writer)
                _close_quietly(writer, "FAILED")

    def epoch(self, record: dict[str, Any], step: int, steps: list[tuple]) -> None:
        """One epoch's record (at optimizer step `step`) and its steps' (step, lr, loss sum, units)."""
        import torch

        rows = [r for r in steps if r[3]]  # a step where this rank had no rows has no loss of its own
        sums = torch.stack([r[2] for r in rows]).tolist() if rows else []  # one copy off the device
        per_step = [(r[0], r[1], total / r[3]) for r, total in zip(rows, sums, strict=True)]
        self._each("epoch", record, step, per_step)

    def finish(self, config: Any, run: Any, report: dict[str, Any]) -> None:
        self._each("finish", config, run, report)

    def close(self, status: str = "FINISHED") -> None:
        """End every writer's run: FINISHED, KILLED or FAILED (see end_status)."""
        for writer in self.writers:
            _close_quietly(writer, status)
        self.writers = []


def _close_quietly(writer: Any, status: str) -> None:
    try:
        writer.close(status)
    except Exception as error:
        log.warning("%s tracking did not close cleanly (%s)", writer.name, one_line(error))


def open_trackers(config: Any, run: Any, main: bool, resumed_step: int | None) -> Trackers:
    """The writers train.log_to names, on rank 0 (none elsewhere). resumed_step: the optimizer step a
    resumed run continues after (TensorBoard drops what an earlier attempt logged past it)."""
    if not main or not config.train.log_to:
        return Trackers([])
    writers: list[Any] = []
    for name in config.train.log_to:
        try:
            if name == "tensorboard":
                from danlu.tracking.tensorboard_writer import TensorBoardWriter

                writers.append(TensorBoardWriter(run, resumed_step))
            else:
                from danlu.tracking.mlflow_writer import MlflowWriter

                writers.append(MlflowWriter(config, run, resumed=resumed_step is not None))
        except DanluError as error:
            log.warning("%s tracking is off for this run: %s", name, error)
        except Exception as error:
            log.warning("%s tracking is off for this run (%s)", name, one_line(error))
    return Trackers(writers)
