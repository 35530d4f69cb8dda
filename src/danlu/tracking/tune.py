"""`danlu tune`: a hyperparameter search over danlu runs, as an Optuna study (TPE sampling, median
pruning on the monitored validation metric after every epoch) kept in OUT/study.db (SQLite), so a stopped
search resumes where it stopped and several processes share it. Each trial is a normal run in
OUT/trials/NNN/ with OUT/trials/NNN/trial.json beside its files; pruned trials stay, marked. At the end
OUT/best.yaml is the best trial's config and OUT/plots/ holds the optimization history and the parameter
importances. `--backend ray` runs the same search on Ray Tune (tracking/ray_tune.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from danlu.config import MAXIMIZED_MONITORS, Config, resolve_paths, validate
from danlu.errors import DanluError, one_line
from danlu.run import RunDir, atomic_write_json, atomic_write_text
from danlu.tracking import MLFLOW_PARENT, Stopped
from danlu.tracking.space import Dimension, parse_space, with_values

log = logging.getLogger("danlu")

STUDY_FILE = "study.db"
LOCK_FILE = "study.lock"
STUDY_NAME = "danlu"
TRIALS = "trials"
BEST_CONFIG = "best.yaml"
RAY_FOLDER = "ray"  # --backend ray: Ray Tune's own experiment state
# a process that stopped (SIGKILL, a lost machine) leaves its trial RUNNING; its heartbeat stops, and after
# the grace period the next process to start a trial marks it failed
HEARTBEAT_S, GRACE_S = 5, 20
UNPRUNED_EPOCHS = 1  # the median pruner leaves every trial's first epoch alone (its metric is noisy)
STARTUP_TRIALS = 5  # and prunes only once this many trials have finished


@dataclass
class SearchSpec:
    """What one search runs: everything a worker process needs, as plain data."""

    base: dict[str, Any]  # the config as given (unset keys unset, so family defaults still apply)
    space: dict[str, Any]  # the space mapping as written
    out: str
    trials: int
    timeout_s: float | None = None
    sampler: str = "tpe"  # tpe, or random (the baseline: Optuna's RandomSampler)
    prune: bool = True
    seed: int = 0
    monitor: str = "val_loss"
    started: float = field(default_factory=time.monotonic)
    mlflow_parent: str | None = None  # the search's MLflow run, when its runs log to MLflow

    @property
    def tracks_mlflow(self) -> bool:
        return "mlflow" in (self.base.get("train") or {}).get("log_to", [])

    @property
    def direction(self) -> str:
        return "maximize" if self.monitor in MAXIMIZED_MONITORS else "minimize"

    @property
    def dimensions(self) -> list[Dimension]:
        """The space's dimensions (checked against the config once, by danlu.tune, before any trial)."""
        return parse_space(self.space, self.base, check=False)


@dataclass
class TuneResult:
    """A finished search: its folder, the trials (number, state, value, params, seconds, test) in order,
    and the best of them (None when no trial completed)."""

    out: Path
    monitor: str
    direction: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None

    @property
    def best_config(self) -> Path:
        return self.out / BEST_CONFIG


def trial_dir(out: str | Path, number: int) -> Path:
    return Path(out) / TRIALS / f"{number:03d}"


def base_config(config: Config) -> dict[str, Any]:
    """The raw config trials start from: paths absolute (trials run from any folder), unset keys unset."""
    resolved = resolve_paths(config, Path.cwd())
    return resolved.model_dump(mode="json", exclude_unset=True)


def check_out(out: Path, backend: str = "optuna") -> None:
    """A search writes into a new or empty folder, or continues the search of the same backend there."""
    if out.exists() and not out.is_dir():
        raise DanluError(f"'{out}' is a file", "choose another --out folder")
    ray, study = (out / RAY_FOLDER).is_dir(), (out / STUDY_FILE).is_file()
    if ray and backend != "ray":
        raise DanluError(
            f"'{out}' holds a search Ray Tune ran", "continue it with --backend ray, or choose another --out"
        )
    if study and backend == "ray":
        raise DanluError(
            f"'{out}' holds an Optuna search ({STUDY_FILE})",
            "continue it without --backend ray, or choose another --out",
        )
    if out.is_dir() and any(out.iterdir()) and not (ray or study):
        raise DanluError(
            f"'{out}' is not empty and holds no search ({STUDY_FILE} or {RAY_FOLDER}/)",
            "choose a new or empty --out folder",
        )


def _storage(out: str | Path) -> Any:
    import optuna

    Path(out).mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{Path(out).resolve() / STUDY_FILE}"
    with _stable():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}},  # processes sharing the file wait for its lock
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
        )


@contextlib.contextmanager
def _stable() -> Iterator[None]:
    """Optuna's heartbeats work as documented since Optuna 2.9 but still carry its experimental mark,
    which it warns about at every use."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def _sampler(spec: SearchSpec, worker: int) -> Any:
    import optuna

    seed = spec.seed + worker  # workers sharing a study must not suggest the same values
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def open_study(spec: SearchSpec, worker: int = 0) -> Any:
    """The search's study, created on first use; a study of another config or space is refused."""
    import optuna

    # danlu says one line per trial itself (Optuna would add a traceback per failed trial)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=STARTUP_TRIALS,
            n_warmup_steps=UNPRUNED_EPOCHS + 1,  # steps are epochs from 1
        )
        if spec.prune
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=_storage(spec.out),
        study_name=STUDY_NAME,
        direction=spec.direction,
        sampler=_sampler(spec, worker),
        pruner=pruner,
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("danlu")
    mine = {"base": spec.base, "space": spec.space, "monitor": spec.monitor}
    if recorded is None:
        study.set_user_attr("danlu", mine)
    elif json.dumps(recorded, sort_keys=True) != json.dumps(mine, sort_keys=True):
        raise DanluError(
            f"'{spec.out}' holds a search of another config, space or monitor",
            "continue it with the same config and --space, or choose another --out",
        )
    return study


def start_tracking(spec: SearchSpec, name: str, study: Any = None) -> None:
    """When the trials log to MLflow: the search's own MLflow run, their parent (kept in the study, so
    a resumed search and every process of it use the same one). A failure is a warning."""
    if not spec.tracks_mlflow:
        return
    from danlu.tracking.mlflow_writer import start_search_run

    parent = study.user_attrs.get("mlflow_parent") if study is not None else None
    if parent is None:
        try:
            parent = start_search_run(validate(spec.base), name, spec.space)
        except Exception as error:
            log.warning(
                "the search's own MLflow run was not made (%s); its trials log alone", one_line(error)
            )
            return
        if study is not None:
            study.set_user_attr("mlflow_parent", parent)
    spec.mlflow_parent = parent


def end_tracking(spec: SearchSpec, result: TuneResult) -> None:
    if spec.mlflow_parent is None:
        return
    from danlu.tracking.mlflow_writer import end_search_run

    try:
        end_search_run(spec.mlflow_parent, result)
    except Exception as error:
        log.warning("the search's MLflow run did not end cleanly (%s)", one_line(error))


@contextlib.contextmanager
def trial_of(spec: SearchSpec) -> Iterator[None]:
    """A trial's danlu.train: its MLflow run under the search's."""
    token = MLFLOW_PARENT.set(spec.mlflow_parent)
    try:
        yield
    finally:
        MLFLOW_PARENT.reset(token)


def pruned(message: str) -> BaseException:
    """Optuna's TrialPruned that is also danlu's Stopped: the trial's trackers end it as killed."""
    import optuna

    class Pruned(optuna.TrialPruned, Stopped):
        pass

    return Pruned(message)


def _best_value(history: list[dict[str, Any]], monitor: str, restore_best: bool) -> float | None:
    values = [r[monitor] for r in history if isinstance(r.get(monitor), (int, float))]
    if not values:
        return None
    if not restore_best:
        return values[-1]
    return max(values) if monitor in MAXIMIZED_MONITORS else min(values)


def _write_trial(out: Path, record: dict[str, Any]) -> None:
    if out.is_dir():  # a trial that failed before its run existed has no folder
        atomic_write_json(RunDir(out).trial, record)


def _objective(spec: SearchSpec, dimensions: list[Dimension]):
    import optuna

    import danlu

    def objective(trial: optuna.Trial) -> float:
        params = {d.key: d.suggest(trial) for d in dimensions}
        out = trial_dir(spec.out, trial.number)
        config = validate(with_values(spec.base, params))
        record = {"number": trial.number, "params": params, "monitor": spec.monitor}

        def report(epoch_record: dict[str, Any], _checkpoint: Path | None) -> None:
            value = epoch_record.get(spec.monitor)
            if isinstance(value, (int, float)) and math.isfinite(value):
                trial.report(value, epoch_record["epoch"])
                if trial.should_prune():
                    raise pruned(f"epoch {epoch_record['epoch']}: {spec.monitor}={value:.4g}")

        try:
            with trial_of(spec):
                run = danlu.train(config, out=out, overwrite=True, progress=False, on_epoch=report)
        except optuna.TrialPruned as stop:
            _write_trial(out, {**record, "state": "pruned", "at": str(stop)})
            raise
        except DanluError as error:
            trial.set_user_attr("error", str(error))
            _write_trial(out, {**record, "state": "failed", "error": str(error)})
            raise
        value = _best_value(run.metrics, spec.monitor, config.train.restore_best)
        if value is None:
            raise DanluError(
                f"trial {trial.number} logged no {spec.monitor}",
                "tune on a metric the runs validate (train.monitor), with validation rows",
            )
        test = run.report.get("test") or {}
        trial.set_user_attr("test", {k: v for k, v in test.items() if isinstance(v, (int, float))})
        _write_trial(out, {**record, "state": "complete", "value": value, "test": test})
        return value

    return objective


def _finished(study: Any) -> tuple[int, int]:
    """(trials finished in any state, trials running now) in the shared study."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for s in states)
    return done, states.count(TrialState.RUNNING)


def run_worker(spec: SearchSpec, worker: int = 0, threads: int | None = None) -> None:
    """Start trials until the search has spec.trials of them (finished or running, in any process) or
    its timeout has passed. One process of a search: `danlu tune --jobs K` starts K, and other commands
    on the same --out join them."""
    import optuna

    if threads:
        import torch

        torch.set_num_threads(threads)
    dimensions = spec.dimensions
    study = open_study(spec, worker)
    objective = _objective(spec, dimensions)
    claim = Claim(spec.out)
    while spec.timeout_s is None or time.monotonic() - spec.started < spec.timeout_s:
        with _stable():
            optuna.storages.fail_stale_trials(study)  # trials of a process that stopped
        if not _next_trial(study, objective, claim, spec.trials):
            break


class Claim:
    """An exclusive lock on OUT/study.lock, which every process searching OUT takes from counting the
    trials to its next trial's start: without it two processes could both count one trial left and
    both start it. (Its own file: SQLite's locks on study.db are POSIX record locks, which closing any
    descriptor of that file in the process would drop.)"""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.file: Any = None

    def acquire(self) -> None:
        import fcntl

        self.file = self.path.open("a")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        """Closing the file releases its lock; a claim already released stays so."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _next_trial(study: Any, objective: Callable[[Any], float], claim: Claim, trials: int) -> bool:
    """Run one more trial, unless the search has all its trials. `claim` is held until the trial is in
    the study as running (Optuna adds it before calling the objective), so another process counts it."""
    claim.acquire()

    def started(trial: Any) -> float:
        claim.release()
        return objective(trial)

    try:
        done, running = _finished(study)
        if done + running >= trials:
            return False
        study.optimize(started, n_trials=1, catch=(DanluError,), callbacks=[_say(trials)])
        return True
    finally:
        claim.release()


def _fail_reason(trial: Any) -> str | None:
    """Why a trial failed (its DanluError), if it did."""
    return trial.user_attrs.get("error")


def _say(total: int):
    """A callback saying one line per finished trial, with how far the whole search is."""

    def say(study: Any, trial: Any) -> None:
        value = "" if trial.value is None else f" {study.user_attrs['danlu']['monitor']}={trial.value:.6g}"
        reason = _fail_reason(trial)
        note = f" ({reason})" if reason else ""
        state = "failed" if trial.state.name == "FAIL" else trial.state.name.lower()
        done, _ = _finished(study)
        log.info("trial %03d %s%s%s [%d/%d]", trial.number, state, value, note, done, total)

    return say


def _worker_main(spec: SearchSpec, worker: int, threads: int, level: int) -> None:
    logging.basicConfig(level=level, format="danlu: %(message)s")  # the parent's: -q stays quiet
    run_worker(spec, worker, threads)


def run_jobs(spec: SearchSpec, jobs: int) -> None:
    """The search in `jobs` processes sharing its study (spawned: torch does not survive fork)."""
    if jobs == 1:
        run_worker(spec)
        return
    open_study(spec)  # the storage's tables and the study, made once before processes race to make them
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger("danlu").getEffectiveLevel()
    workers = [context.Process(target=_worker_main, args=(spec, i, threads, level)) for i in range(jobs)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [w.exitcode for w in workers if w.exitcode]
    if failed:
        raise DanluError(
            f"{len(failed)} of {jobs} search processes failed (exit codes {failed})",
            "run again with --debug; the search resumes where it stopped",
        )


def _trial_rows(study: Any, dimensions: list[Dimension]) -> list[dict[str, Any]]:
    decode = {d.key: d for d in dimensions}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append(
            {
                "number": trial.number,
                "state": "failed" if trial.state.name == "FAIL" else trial.state.name.lower(),
                "value": trial.value,
                "epochs": trial.last_step,
                "params": {k: decode[k].decode(v) if k in decode else v for k, v in trial.params.items()},
                "seconds": None if seconds is None else round(seconds, 3),
                "test": trial.user_attrs.get("test"),
                "error": _fail_reason(trial),
            }
        )
    return rows


def finish_search(spec: SearchSpec) -> TuneResult:
    """The search's result from its study as it stands (see write_result)."""
    study = open_study(spec)
    return write_result(spec, _trial_rows(study, spec.dimensions), study)


def write_result(spec: SearchSpec, rows: list[dict[str, Any]], study: Any) -> TuneResult:
    """best.yaml (the best completed trial's config, to train again with `danlu train`) and the plots of
    `study`; the trials and the best of them."""
    out = Path(spec.out)
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if rows and all(r["state"] == "failed" for r in rows):
        first, why = rows[0], rows[0].get("error") or "see above"
        raise DanluError(f"all {len(rows)} trials failed; trial {first['number']:03d}: {why}")
    if not complete:
        return TuneResult(out, spec.monitor, spec.direction, rows, None)
    pick = max if spec.direction == "maximize" else min
    best = pick(complete, key=lambda r: r["value"])
    config = yaml.safe_load(RunDir(trial_dir(out, best["number"])).config.read_text())
    config["output"] = str(out / "best")
    header = (
        f"# danlu tune: the best of {len(rows)} trials, trial {best['number']:03d} "
        f"({spec.monitor}={best['value']:.6g}); `danlu train` this file to train it again\n"
    )
    atomic_write_text(out / BEST_CONFIG, header + yaml.safe_dump(config, sort_keys=False))
    best = {**best, "config": str(out / BEST_CONFIG), "run": str(trial_dir(out, best["number"]))}
    _plots(study, out / "plots")
    return TuneResult(out, spec.monitor, spec.direction, rows, best)


def _plots(study: Any, folder: Path) -> None:
    """The optimization history and the parameter importances (Optuna's own matplotlib plots)."""
    from danlu.evaluation.plots import _save, pyplot

    pyplot()  # Optuna draws through pyplot: Agg unless the process chose a backend
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(exist_ok=True)
    drawings = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
    }
    for name, draw in drawings.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw(study)
            _save(axes.figure, folder / name)
        except (ValueError, RuntimeError) as error:  # importances need two completed trials
            log.warning("no %s: %s", name, one_line(error))
