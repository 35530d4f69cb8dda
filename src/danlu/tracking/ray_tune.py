"""`danlu tune --backend ray`: the same search on Ray Tune, each trial a danlu run on one of the cluster's
workers. Ray Tune's OptunaSearch samples (TPE, or random), its MedianStoppingRule prunes on the same
monitored metric after every epoch; the trial folders, trial.json, best.yaml and plots are those of the
Optuna backend. Ray keeps its own experiment state in OUT/ray/tune/, and danlu what the search is in
OUT/ray/danlu.json: run again, a stopped search continues from Ray Tune's state (Tuner.restore), its
finished trials kept and its unfinished ones started again, each in its own folder."""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from danlu.config import MAXIMIZED_MONITORS, validate
from danlu.errors import DanluError
from danlu.run import RunDir, atomic_write_json, atomic_write_text, read_json
from danlu.tracking.space import with_values
from danlu.tracking.tune import (
    RAY_FOLDER,
    STARTUP_TRIALS,
    TRIALS,
    UNPRUNED_EPOCHS,
    SearchSpec,
    TuneResult,
    _best_value,
    _sampler,
    _write_trial,
    start_tracking,
    trial_dir,
    trial_of,
    write_result,
)

log = logging.getLogger("danlu")
CLAIMS = "claims"  # OUT/claims/RAY_TRIAL_ID: the trial number that Ray trial took
OBJECTIVE = "objective"  # what each trial reports: the best monitored value so far (what a trial scores)
EXPERIMENT = "tune"  # OUT/ray/tune: Ray Tune's experiment
RECORD = "danlu.json"  # OUT/ray/danlu.json: the search (config, space, settings) and its MLflow run


def _claim_folder(out: str, ray_trial: str) -> tuple[int, Path]:
    """The trial's OUT/trials/NNN: its own when Ray starts it again (a restarted actor; OUT/claims/ names
    each Ray trial's number), else the next free one, made here. mkdir is atomic, so trials starting at
    once on any of the cluster's machines (OUT on storage they share) never take the same number."""
    claims = Path(out) / CLAIMS
    claim = claims / ray_trial
    if claim.is_file():
        number = int(claim.read_text())
        return number, trial_dir(out, number)
    folder = Path(out) / TRIALS
    folder.mkdir(parents=True, exist_ok=True)
    claims.mkdir(exist_ok=True)
    number = len(list(folder.iterdir()))
    while True:
        try:
            trial_dir(out, number).mkdir()
            break
        except FileExistsError:
            number += 1
    atomic_write_text(claim, str(number))
    return number, trial_dir(out, number)


def _trainable(params: dict[str, Any], spec: SearchSpec) -> None:
    """One trial, in a Ray worker: a danlu run, reporting the best monitored value after every epoch."""
    from ray import tune

    import danlu

    dims = {d.key: d for d in spec.dimensions}
    values = {key: dims[key].decode(value) for key, value in params.items()}
    ray_trial = tune.get_context().get_trial_id()
    number, out = _claim_folder(spec.out, ray_trial)
    config = validate(with_values(spec.base, values))
    record = {"number": number, "params": values, "monitor": spec.monitor, "ray_trial": ray_trial}
    maximize = spec.monitor in MAXIMIZED_MONITORS
    best: list[float] = []

    def report(epoch_record: dict[str, Any], _checkpoint: Path | None) -> None:
        value = epoch_record.get(spec.monitor)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            return
        best[:] = [value if not best else (max if maximize else min)(best[0], value)]
        _write_trial(out, {**record, "state": "running", "epoch": epoch_record["epoch"], "value": best[0]})
        tune.report({"epoch": epoch_record["epoch"], OBJECTIVE: best[0], "trial": number})

    try:
        with trial_of(spec):
            run = danlu.train(config, out=out, overwrite=True, progress=False, on_epoch=report)
    except DanluError as error:
        _write_trial(out, {**record, "state": "failed", "error": str(error)})
        raise
    value = _best_value(run.metrics, spec.monitor, config.train.restore_best)
    _write_trial(out, {**record, "state": "complete", "value": value, "test": run.report.get("test")})


def _rows(spec: SearchSpec, results: Any) -> list[dict[str, Any]]:
    """The trials from their folders' trial.json. A trial the scheduler stopped (pruned) or that failed
    between two epochs never wrote its end: Ray's result says which."""
    reported = {r.metrics["trial"]: r for r in results if (r.metrics or {}).get("trial") is not None}
    rows: list[dict[str, Any]] = []
    trials = Path(spec.out) / TRIALS
    for folder in sorted(trials.iterdir()) if trials.is_dir() else ():
        try:
            trial = read_json(RunDir(folder).trial)
        except (OSError, DanluError):
            continue  # stopped before it wrote anything
        result = reported.get(trial["number"])
        if trial["state"] == "running":
            trial["state"] = "failed" if result is None or result.error else "pruned"
            _write_trial(folder, trial)
        metrics = result.metrics if result is not None else {}
        rows.append(
            {
                "number": trial["number"],
                "state": trial["state"],
                "value": trial.get("value"),
                "epochs": metrics.get("epoch"),
                "params": trial["params"],
                "seconds": round(metrics["time_total_s"], 3) if "time_total_s" in metrics else None,
                "test": trial.get("test"),
                "error": trial.get("error"),
            }
        )
    return rows


def _study_of(spec: SearchSpec, rows: list[dict[str, Any]]) -> Any:
    """An in-memory Optuna study of the finished trials, for Optuna's plots."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=spec.direction)
    dims = spec.dimensions
    distributions = {d.key: d.distribution() for d in dims}
    for row in rows:
        if row["state"] not in ("complete", "pruned"):
            continue
        complete = row["state"] == "complete" and row["value"] is not None
        study.add_trial(
            create_trial(
                params={d.key: d.encode(row["params"][d.key]) for d in dims},
                distributions=distributions,
                value=row["value"] if complete else None,
                state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            )
        )
    return study


SEARCH = ("base", "space", "monitor")  # what the search is, as the Optuna backend's study records it
# what Ray Tune keeps of a search when it continues it: the settings its sampler and scheduler were made with
SETTINGS = ("trials", "sampler", "prune", "seed")


def _record(spec: SearchSpec) -> dict[str, Any]:
    values = asdict(spec)
    return {key: values[key] for key in (*SEARCH, *SETTINGS)}


def _continued(spec: SearchSpec) -> dict[str, Any] | None:
    """The record of the Ray search already in OUT, None when there is none; raises when the search
    asked for is another one (Ray Tune restores a search's sampler, scheduler and trial count as they
    were, so a change would be ignored)."""
    folder = Path(spec.out) / RAY_FOLDER
    try:
        recorded = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        if (folder / EXPERIMENT).exists():  # Ray's state with no record of what it searched
            raise DanluError(
                f"'{spec.out}' holds a Ray search danlu cannot check (no {RAY_FOLDER}/{RECORD})",
                "choose another --out",
            ) from None
        return None
    except (OSError, ValueError) as error:
        raise DanluError(
            f"cannot read the Ray search's {RECORD} in '{spec.out}': {error}", "choose another --out"
        ) from None
    mine = json.loads(json.dumps(_record(spec)))  # as JSON reads it back
    if any(recorded.get(key) != mine[key] for key in SEARCH):
        raise DanluError(
            f"'{spec.out}' holds a search of another config, space or monitor",
            "continue it with the same config and --space, or choose another --out",
        )
    if any(recorded.get(key) != mine[key] for key in SETTINGS):
        was = recorded.get("prune")
        raise DanluError(
            f"'{spec.out}' holds a Ray search of --trials {recorded.get('trials')} --sampler "
            f"{recorded.get('sampler')} --seed {recorded.get('seed')}{'' if was else ' --no-prune'}",
            "continue it with those (Ray Tune keeps a search's settings), or choose another --out",
        )
    return recorded


def tune_with_ray(spec: SearchSpec, jobs: int, address: str | None) -> TuneResult:
    """Run the search on Ray Tune (a local Ray, or the cluster at `address`), `jobs` trials at once; or
    continue the one in OUT/ray/ where it stopped."""
    try:
        import optuna  # noqa: F401  (the samplers: danlu[track])
        from ray import tune
        from ray.tune.schedulers import MedianStoppingRule
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise DanluError("--backend ray needs Ray Tune", "pip install 'danlu[ray,track]'") from None
    from danlu.training.ray_train import init_ray

    recorded = _continued(spec)  # before Ray starts
    init_ray(address)
    import ray

    spec.mlflow_parent = recorded.get("mlflow_parent") if recorded is not None else None
    if spec.mlflow_parent is None:
        start_tracking(spec, Path(spec.out).name)  # before the trials: each is handed its parent run
    record = {**_record(spec), "mlflow_parent": spec.mlflow_parent}  # once Ray runs: OUT/ray/ is its
    atomic_write_json(Path(spec.out) / RAY_FOLDER / RECORD, record)

    mode = "max" if spec.direction == "maximize" else "min"
    sampler = _sampler(spec, worker=0)  # the Optuna backend's: TPE or random, seeded alike
    searcher = OptunaSearch(
        space={d.key: d.distribution() for d in spec.dimensions}, metric=OBJECTIVE, mode=mode, sampler=sampler
    )
    scheduler = (
        MedianStoppingRule(
            time_attr="epoch",
            metric=OBJECTIVE,
            mode=mode,
            grace_period=UNPRUNED_EPOCHS + 1,  # stops only when epoch >= grace_period
            min_samples_required=STARTUP_TRIALS,
        )
        if spec.prune
        else None
    )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec=spec), {"cpu": max(1, cpus // jobs)}
    )
    experiment = Path(spec.out) / RAY_FOLDER / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        log.info("continuing the Ray search in %s", experiment)
        # the trials it had not finished start again, each in the folder it claimed (_claim_folder)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
    else:
        tuner = _new_tuner(spec, trainable, searcher, scheduler, jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptunaSearch's notes on steps it saw twice
        results = tuner.fit()
    rows = _rows(spec, results)
    return write_result(spec, rows, _study_of(spec, rows))


def _new_tuner(spec: SearchSpec, trainable: Any, searcher: Any, scheduler: Any, jobs: int) -> Any:
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.trials,
            max_concurrent_trials=jobs,
            time_budget_s=spec.timeout_s,
        ),
        run_config=tune.RunConfig(storage_path=str(Path(spec.out) / RAY_FOLDER), name=EXPERIMENT, verbose=0),
    )
