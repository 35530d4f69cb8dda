"""danlu tune: an Optuna search read back through Optuna's own storage, resumed, shared by two processes,
pruning a bad trial, on Ray Tune; a bad space is one line before any trial; danlu runs lists and compares
the trials."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pytest
import yaml

from tests.conftest import mixed_frame, run_cli, write_config

pytestmark = pytest.mark.slow

SPACE = "train.lr: {low: 1.0e-3, high: 1.0e-1, log: true}\nmodel.hidden: {choices: [[8], [32, 32]]}\n"


def _setup(tmp_path: Path, epochs: int = 4, extra: str = "") -> tuple[Path, Path]:
    mixed_frame(600).to_csv(tmp_path / "mixed.csv", index=False)
    config = write_config(
        tmp_path / "search.yaml",
        f"data: {{train: mixed.csv, target: label}}\n"
        f"train: {{epochs: {epochs}, batch_size: 64, patience: 0{extra}}}\n",
    )
    return config, write_config(tmp_path / "space.yaml", SPACE)


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name="danlu", storage=f"sqlite:///{out / 'study.db'}")


def _trial_json(out: Path, number: int) -> dict:
    return json.loads((out / "trials" / f"{number:03d}" / "trial.json").read_text())


def test_a_search_keeps_its_trials_in_the_study_and_resumes(tmp_path):
    from optuna.trial import TrialState

    config, space = _setup(tmp_path)
    out = tmp_path / "runs" / "search"
    args = ("tune", str(config), "--space", str(space), "--out", str(out))
    result = run_cli(*args, "--trials", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = _study(out)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)  # fewer than 5 finished: nothing pruned
    for trial in trials:
        record = _trial_json(out, trial.number)
        run = out / "trials" / f"{trial.number:03d}"
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert record["state"] == "complete" and (run / "report.json").is_file()
        assert record["value"] == trial.value == min(r["val_loss"] for r in history)
        hidden = yaml.safe_load((run / "config.yaml").read_text())["model"]["hidden"]
        assert hidden == record["params"]["model.hidden"] == json.loads(trial.params["model.hidden"])
        assert 1e-3 <= record["params"]["train.lr"] <= 1e-1
    best = min(trials, key=lambda t: t.value)
    best_config = yaml.safe_load((out / "best.yaml").read_text())
    assert best_config["train"]["lr"] == best.params["train.lr"]
    assert best_config["output"] == str(out.resolve() / "best")
    assert f"best      trial {best.number:03d}: val_loss={best.value:.6g}" in result.stdout
    table = [line for line in result.stdout.splitlines() if line[:3].isdigit()]
    assert len(table) == 4
    for name in ("optimization_history.png", "param_importances.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    # run again with more trials: the four stay as they were, two more join them
    result = run_cli(*args, "--trials", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    again = _study(out).get_trials()
    assert len(again) == 6 and [t.params for t in again[:4]] == [t.params for t in trials]
    # the search is danlu train's: best.yaml trains the best trial again, to the same value
    retrained = run_cli("train", str(out / "best.yaml"), cwd=tmp_path)
    assert retrained.returncode == 0, retrained.stderr
    best_now = _study(out).best_trial
    metrics = [json.loads(line) for line in (out / "best" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in metrics) == pytest.approx(best_now.value, rel=1e-6)

    # danlu runs: every trial, and two of them compared
    listed = run_cli("runs", str(out), "--json", cwd=tmp_path)
    rows = json.loads(listed.stdout)
    assert [Path(r["path"]).name for r in rows] == ["best", "000", "001", "002", "003", "004", "005"]
    assert [r["state"] for r in rows[:5]] == ["complete"] * 5 and {r["family"] for r in rows} == {"tabular"}
    assert {r["state"] for r in rows[5:]} <= {"complete", "pruned"}  # five finished: 004, 005 may be pruned
    compared = json.loads(run_cli("runs", "compare", rows[1]["path"], rows[2]["path"], "--json").stdout)
    assert set(compared["config"]) <= {"train.lr", "model.hidden"} and "train.lr" in compared["config"]
    reports = [json.loads((Path(r["path"]) / "report.json").read_text()) for r in rows[1:3]]
    assert compared["metrics"]["test_accuracy"] == [r["test"]["accuracy"] for r in reports]
    text = run_cli("runs", "compare", rows[1]["path"], rows[2]["path"]).stdout
    assert "train.lr" in text and "test_accuracy" in text


def test_a_trial_far_below_the_median_is_pruned_and_kept(tmp_path, monkeypatch):
    """Five good trials, then one with a learning rate that learns nothing: the median pruner stops it
    after its second epoch; its run stays, marked pruned, and resumable. The trials log to MLflow, each
    under the search's own run; the pruned one ends KILLED."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    monkeypatch.chdir(tmp_path)  # the config's data path is relative, as danlu train reads it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from danlu.config import load_config
    from danlu.tracking import tune

    config, _ = _setup(tmp_path, epochs=6, extra=", log_to: [mlflow]")
    spec = tune.SearchSpec(
        base=tune.base_config(load_config(config)),
        space={"train.lr": {"low": 1e-7, "high": 0.1, "log": True}},
        out=str(tmp_path / "pruning"),
        trials=6,
    )
    study = tune.open_study(spec)
    tune.start_tracking(spec, "pruning", study)
    for lr in (0.05, 0.06, 0.07, 0.08, 0.09, 1e-7):
        study.enqueue_trial({"train.lr": lr})
    tune.run_worker(spec)
    tune.end_tracking(spec, tune.finish_search(spec))
    states = [t.state for t in _study(Path(spec.out)).get_trials()]
    assert states == [TrialState.COMPLETE] * 5 + [TrialState.PRUNED]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("danlu").experiment_id])
    parent = next(r for r in runs if r.info.run_id == spec.mlflow_parent)
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["000", "001", "002", "003", "004", "005"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {spec.mlflow_parent}
    assert [r.info.status for r in children] == ["FINISHED"] * 5 + ["KILLED"]
    best = _study(Path(spec.out)).best_value
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_loss"] == best
    pruned = Path(spec.out) / "trials" / "005"
    record = _trial_json(Path(spec.out), 5)
    assert record["state"] == "pruned" and record["at"].startswith("epoch 2:")
    assert not (pruned / "report.json").exists() and (pruned / "checkpoints" / "last.pt").is_file()
    rows = {Path(r["path"]).name: r for r in __import__("danlu").runs(spec.out)}
    assert rows["005"]["state"] == "pruned" and rows["000"]["state"] == "complete"


def test_two_processes_share_one_search(tmp_path):
    config, space = _setup(tmp_path, epochs=3)
    out = tmp_path / "shared"
    result = run_cli(
        "tune", str(config), "--space", str(space), "--out", str(out), "--trials", "4", "--jobs", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = _study(out).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # seeds differ by process
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001", "002", "003"]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("train.lrr: {low: 0.001, high: 0.1}", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("train.epochs: {choices: [a, b]}", "search space key 'train.epochs' = 'a' does not make a valid"),
        ("train.lr: {low: 0.1}", "search space key 'train.lr': a range needs low and high"),
        ("train.lr: {low: 0, high: 0.1, log: true}", "a log range must be above 0"),
        ("model.hidden: [8, 16]", "search space key 'model.hidden': expected a mapping"),
        # the file's own mistakes are a space file's, not a config file's
        ("- train.lr\n- train.epochs", "the search space must be a non-empty mapping of config keys"),
        ("train.lr: {low: [", "cannot parse '"),
        (None, "search space file 'bad.yaml' not found (fix: pass --space SPACE.yaml)"),
    ],
)
def test_a_bad_space_is_one_line_before_any_trial(tmp_path, space, message):
    config, _ = _setup(tmp_path)
    bad = write_config(tmp_path / "bad.yaml", space + "\n") if space is not None else Path("bad.yaml")
    out = tmp_path / "never"
    result = run_cli("tune", str(config), "--space", str(bad), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_ray_search_killed_midway_continues_from_ray_tunes_state(tmp_path, monkeypatch):
    """danlu tune --backend ray, killed (SIGKILL, with Ray's processes) once a trial has finished and a
    third has started, continues when run again (here through the Python API): the trial that finished
    first is kept as it was, the others run (one killed mid-run starts again in its own folder), and
    each trial is a danlu run tracked in TensorBoard. A search of another space or other settings, or on
    the other backend, is refused in the same folder."""
    import psutil

    import danlu

    monkeypatch.chdir(tmp_path)
    # trials long enough (about a second of training each) that Ray saves its state while the third runs,
    # even on a loaded machine: with 3 epochs the whole search could end between two saves
    config, _ = _setup(tmp_path, epochs=30, extra=", log_to: [tensorboard]")
    space = {"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}, "model.dropout": {"low": 0, "high": 0.5}}
    space_file = write_config(tmp_path / "ray-space.yaml", yaml.safe_dump(space))
    out = tmp_path / "ray-search"
    command = [sys.executable, "-m", "danlu", "-q", "tune", str(config), "--space", str(space_file)]
    command += ["--trials", "3", "--jobs", "2", "--out", str(out), "--backend", "ray"]
    # Ray saves its experiment's state every second rather than every ten
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=DEVNULL, stderr=DEVNULL)
    third, experiment = out / "trials" / "002", out / "ray" / "tune"

    def saved_after_the_third_started() -> bool:
        states = list(experiment.glob("experiment_state-*.json"))
        return third.is_dir() and any(s.stat().st_mtime > third.stat().st_mtime + 0.5 for s in states)

    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline and not saved_after_the_third_started():
        time.sleep(0.1)
    with contextlib.suppress(psutil.NoSuchProcess):  # ended already: the assertion below says so
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
    process.kill()
    assert process.wait() == -9, "the search ended before it could be killed"
    done = [t for t in range(3) if (out / "trials" / f"{t:03d}" / "report.json").is_file()]
    assert done and len(done) < 3
    # the first to finish did so before the third trial was scheduled: Ray's saved state has it finished
    first = min(done, key=lambda t: (out / "trials" / f"{t:03d}" / "report.json").stat().st_mtime)
    report = out / "trials" / f"{first:03d}" / "report.json"
    stamp = report.stat().st_mtime_ns

    result = danlu.tune(config, space, trials=3, jobs=2, out=out, backend="ray")
    assert [r["number"] for r in result.trials] == [0, 1, 2]
    assert all(r["state"] == "complete" for r in result.trials)
    assert report.stat().st_mtime_ns == stamp  # kept, not trained again
    for row in result.trials:
        run = result.out / "trials" / f"{row['number']:03d}"
        assert _trial_json(result.out, row["number"])["params"] == row["params"]
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        config_used = yaml.safe_load((run / "config.yaml").read_text())
        assert config_used["train"]["lr"] == row["params"]["train.lr"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001", "002"]
    assert result.best["value"] == min(r["value"] for r in result.trials)
    assert result.best_config.is_file() and (result.out / "plots" / "optimization_history.png").is_file()

    refusals = [
        ({"space": {"train.lr": space["train.lr"]}}, "holds a search of another config, space or monitor"),
        ({"trials": 4}, "holds a Ray search of --trials 3 --sampler tpe --seed 0"),
        ({"backend": "optuna"}, "holds a search Ray Tune ran"),
    ]
    for change, message in refusals:
        arguments = {"space": space, "trials": 3, "out": out, "backend": "ray", **change}
        with pytest.raises(danlu.DanluError, match=message):
            danlu.tune(config, arguments.pop("space"), **arguments)
    unrecorded = tmp_path / "unrecorded"  # Ray's state, but not danlu's record of the search
    (unrecorded / "ray" / "tune").mkdir(parents=True)
    with pytest.raises(danlu.DanluError, match="holds a Ray search danlu cannot check"):
        danlu.tune(config, space, trials=3, out=unrecorded, backend="ray")
    optuna_search = tmp_path / "optuna-search"
    optuna_search.mkdir()
    (optuna_search / "study.db").write_bytes(b"")
    with pytest.raises(danlu.DanluError, match="holds an Optuna search"):
        danlu.tune(config, space, trials=3, out=optuna_search, backend="ray")


def test_a_search_whose_every_trial_fails_says_why(tmp_path):
    config, space = _setup(tmp_path)
    # the config and its data file are valid; every trial fails on what the data holds
    mixed_frame(600).assign(label="same").to_csv(tmp_path / "mixed.csv", index=False)
    result = run_cli("tune", str(config), "--space", str(space), "--trials", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "danlu: error: all 2 trials failed; trial 000: " in result.stderr
    assert "single class" in result.stderr.strip().splitlines()[-1]


def test_a_trial_whose_process_died_is_failed_by_the_next_search_and_not_counted_running(
    tmp_path, monkeypatch
):
    """A trial left RUNNING by a process that died (its heartbeat stopped) is marked failed once the
    grace period has passed, and the search goes on to its number of trials."""
    import time

    from optuna.trial import TrialState

    from danlu.config import load_config
    from danlu.tracking import tune

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "GRACE_S", 1)  # the storage's grace period, 20 s in use
    config, _ = _setup(tmp_path, epochs=2)
    spec = tune.SearchSpec(
        base=tune.base_config(load_config(config)),
        space={"train.lr": {"low": 1e-3, "high": 0.1, "log": True}},
        out=str(tmp_path / "died"),
        trials=2,
    )
    study = tune.open_study(spec)
    orphan = study.ask()  # as a process's trial when it was killed: RUNNING, one heartbeat, then none
    study._storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.5)
    tune.run_worker(spec)
    states = [t.state for t in _study(Path(spec.out)).get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
