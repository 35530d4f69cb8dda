"""danlu.tracking's own logic: one failing writer is dropped with a warning and the others go on; the
config flattened as trackers store it; a search's processes never both start its last trial."""

from __future__ import annotations

import logging

import torch

from danlu.tracking import Trackers, flatten, numbers


class _Writer:
    def __init__(self, name: str, fail_at: str | None = None) -> None:
        self.name, self.fail_at, self.calls, self.closed = name, fail_at, [], None

    def _call(self, method: str, *args) -> None:
        if method == self.fail_at:
            raise OSError("No space left on device")
        self.calls.append((method, args))

    def epoch(self, *args):
        self._call("epoch", *args)

    def finish(self, *args):
        self._call("finish", *args)

    def close(self, status):
        self.closed = status


def test_a_failing_writer_is_dropped_with_one_warning_and_the_others_go_on(caplog):
    good, bad = _Writer("good"), _Writer("bad", fail_at="epoch")
    trackers = Trackers([bad, good])
    steps = [(1, 0.1, torch.tensor(6.0), 3), (2, 0.05, torch.tensor(0.0), 0), (3, 0.01, torch.tensor(2.0), 4)]
    with caplog.at_level(logging.WARNING, logger="danlu"):
        trackers.epoch({"epoch": 1, "val_loss": 0.5}, 3, steps)
        trackers.epoch({"epoch": 2, "val_loss": 0.4}, 6, [])
    assert [r.getMessage() for r in caplog.records] == [
        "bad tracking failed (No space left on device); training goes on without it"
    ]
    assert bad.closed == "FAILED" and trackers.writers == [good]
    # per step: the loss per row; a step where this process had no rows is left out
    assert good.calls[0] == ("epoch", ({"epoch": 1, "val_loss": 0.5}, 3, [(1, 0.1, 2.0), (3, 0.01, 0.5)]))
    trackers.finish("config", "run", {"test": {}})
    trackers.close()
    assert good.closed == "FINISHED" and not trackers


def test_flatten_and_numbers():
    config = {"train": {"lr": 0.01, "log_to": ["mlflow"], "grad_clip": None}, "output": "runs/a"}
    assert flatten(config) == {
        "train.lr": 0.01, "train.log_to": '["mlflow"]', "train.grad_clip": "null", "output": "runs/a"
    }  # fmt: skip
    assert numbers({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": 2.5}) == {"a": 1.0, "e": 2.5}


def test_a_space_reads_ranges_as_ints_or_floats_and_sets_values_as_typed():
    from danlu.tracking.space import parse_space, with_values

    base = {"data": {"train": "synthetic:classification"}}
    dims = parse_space(
        {
            "train.epochs": {"low": 10, "high": 50, "step": 10},
            "train.lr": {"low": 1.0e-5, "high": 0.1, "log": True},
            "model.hidden": {"choices": [[8], [32, 32]]},
        },
        base,
    )
    assert [d.kind for d in dims] == ["int", "float", "choice"]
    assert [d.decode(d.encode(c)) for c in dims[2].choices for d in dims[2:]] == [[8], [32, 32]]
    raw = with_values(base, {"train.lr": 1e-05, "model.hidden": [8]})
    assert raw["train"]["lr"] == 1e-05 and raw["model"]["hidden"] == [8]  # a float, not the text "1e-05"
    assert base == {"data": {"train": "synthetic:classification"}}  # the base is not changed


def test_a_stopped_run_ends_killed_and_a_failed_one_failed():
    from danlu.tracking import end_status
    from danlu.tracking.tune import pruned

    assert end_status(None) == "FINISHED"
    assert end_status(KeyboardInterrupt()) == end_status(pruned("epoch 2")) == "KILLED"
    assert end_status(ValueError("boom")) == "FAILED"


def test_two_processes_counting_the_last_trial_at_once_start_it_once(monkeypatch, tmp_path):
    """The first searcher pauses between counting the trials and starting its own: the second, counting
    meanwhile, must wait for the first's trial to be in the study, and then finds none left."""
    import threading
    import time

    import optuna

    from danlu.tracking import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.set_user_attr("danlu", {"monitor": "val_loss"})
    counted, finished = threading.Event(), tune._finished

    def slow_count(study):
        result = finished(study)
        if threading.current_thread().name == "first":
            counted.set()
            time.sleep(0.5)  # the second searcher counts now, unless the claim keeps it out
        return result

    monkeypatch.setattr(tune, "_finished", slow_count)
    started = []

    def search():  # each its own claim on the file, as each process has
        started.append(tune._next_trial(study, lambda trial: 1.0, tune.Claim(tmp_path), trials=1))

    first = threading.Thread(target=search, name="first")
    first.start()
    counted.wait(10)
    second = threading.Thread(target=search, name="second")
    second.start()
    first.join(10)
    second.join(10)
    assert sorted(started) == [False, True]
    assert len(study.trials) == 1


def test_a_damaged_tracking_record_starts_a_new_mlflow_run(tmp_path):
    """A resumed run whose tracking.json was cut short logs into a new MLflow run rather than failing."""
    from danlu.run import RunDir
    from danlu.tracking.mlflow_writer import _previous

    run = RunDir(tmp_path)
    run.tracking.write_text('{"mlflow": {"run_id": "abc", "tracking_uri": "file:/x"}}')
    assert _previous(run, "file:/x") == "abc"
    run.tracking.write_text('{"mlflow": {"run_')
    assert _previous(run, "file:/x") is None
