"""The held-out rows recorded in the run directory: stored rows, row numbers, chunk plans and separate files,
each giving back exactly the rows the report was computed on, or one clear error when the data changed."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import danlu
from danlu.data import heldout
from danlu.errors import DanluError
from danlu.run import RunDir
from tests.conftest import mixed_frame, regression_frame


def fit(out, data, target, *overrides):
    args = [f"data.train={data}", f"data.target={target}", "train.epochs=2", *overrides]
    return danlu.train(None, args, out=out, progress=False)


def record(run):
    return json.loads((run.path / "heldout.json").read_text())


def assert_evaluates_as_reported(run, keys=("accuracy", "log_loss")):
    again = danlu.evaluate(run.path)
    for key in keys:
        assert again[key] == pytest.approx(run.report["test"][key], rel=1e-9)


def test_small_held_out_rows_are_stored_and_survive_the_data_file(tmp_path):
    data = tmp_path / "mixed.csv"
    mixed_frame(400).to_csv(data, index=False)
    run = fit(tmp_path / "run", data, "label")
    rec = record(run)
    assert rec["kind"] == "stored" and rec["split"] == "test" and rec["rows"] == run.report["rows"]["test"]
    assert rec["fingerprints"][str(data)]["bytes"] == data.stat().st_size
    data.unlink()  # moved away: the run still evaluates, with the same numbers
    assert_evaluates_as_reported(run)
    copy = shutil.copytree(run.path, tmp_path / "elsewhere")  # a run copied to another machine
    assert danlu.evaluate(copy)["accuracy"] == pytest.approx(run.report["test"]["accuracy"])


def test_large_held_out_rows_are_row_numbers_checked_against_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(heldout, "MAX_STORED_BYTES", 0)
    data = tmp_path / "house.csv"
    regression_frame(300).to_csv(data, index=False)
    run = fit(tmp_path / "run", data, "price")
    assert record(run)["kind"] == "indices"
    assert len(np.load(run.path / "heldout.npy")) == run.report["rows"]["test"]
    assert_evaluates_as_reported(run, ("mae", "rmse", "r2"))

    changed = pd.read_csv(data)
    changed.loc[5, "price"] += 1.0
    changed.to_csv(data, index=False)
    with pytest.raises(DanluError, match=r"house\.csv' has changed since run .* was trained"):
        danlu.evaluate(run.path)
    data.unlink()
    with pytest.raises(DanluError, match="which is no longer there"):
        danlu.evaluate(run.path)
    regression_frame(50, seed=3).to_csv(tmp_path / "labelled.csv", index=False)
    assert danlu.evaluate(run.path, tmp_path / "labelled.csv")["r2"] is not None  # explicit data still works


def test_chunked_runs_record_their_split_plan(tmp_path):
    frame = regression_frame(3000)
    frame.to_parquet(tmp_path / "d.parquet", row_group_size=500, index=False)
    run = fit(tmp_path / "run", tmp_path / "d.parquet", "price", "data.in_memory=false")
    rec = record(run)
    assert rec["kind"] == "chunks" and rec["plan"]["part"] == 2 and rec["plan"]["test_fraction"] == 0.2
    assert_evaluates_as_reported(run, ("mae", "rmse", "r2"))
    frame.assign(price=frame["price"] * 2).to_parquet(tmp_path / "d.parquet", row_group_size=500, index=False)
    with pytest.raises(DanluError, match="has changed"):
        danlu.evaluate(run.path)


def test_a_separate_test_file_is_stored_or_fingerprinted(tmp_path, monkeypatch):
    mixed_frame(300, 0).to_csv(tmp_path / "train.csv", index=False)
    mixed_frame(120, 1).to_csv(tmp_path / "test.csv", index=False)
    run = fit(tmp_path / "a", tmp_path / "train.csv", "label", f"data.test={tmp_path / 'test.csv'}")
    assert record(run)["kind"] == "stored" and record(run)["rows"] == 120
    monkeypatch.setattr(heldout, "MAX_STORED_BYTES", 0)
    run = fit(tmp_path / "b", tmp_path / "train.csv", "label", f"data.test={tmp_path / 'test.csv'}")
    rec = record(run)
    assert rec["kind"] == "file" and set(rec["fingerprints"]) == {
        str(tmp_path / "train.csv"),
        str(tmp_path / "test.csv"),
    }
    from danlu.data import sources

    reads, read_csv = [], sources._read_csv
    monkeypatch.setattr(sources, "_read_csv", lambda path, **kw: reads.append(kw) or read_csv(path, **kw))
    assert_evaluates_as_reported(run)
    assert reads and all("chunksize" in kw for kw in reads)  # streamed once, never loaded whole to hash it
    mixed_frame(120, 2).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DanluError, match=r"test\.csv' has changed"):
        danlu.evaluate(run.path)
    (tmp_path / "test.csv").unlink()
    with pytest.raises(DanluError, match="no longer there"):
        danlu.evaluate(run.path)


def test_a_run_without_held_out_rows_keeps_a_training_sample_for_export_checks(tmp_path):
    mixed_frame(200).to_csv(tmp_path / "d.csv", index=False)
    run = fit(tmp_path / "run", tmp_path / "d.csv", "label", "data.val_fraction=0", "data.test_fraction=0")
    rec = record(run)
    assert rec["split"] == "none" and rec["kind"] == "stored" and rec["rows"] == 200
    with pytest.raises(DanluError, match="held no rows out"):
        danlu.evaluate(run.path)
    from danlu.export import export_run

    result = export_run(run.path, "onnx")
    assert result["split"] == "train" and result["rows"] == 200


def test_resume_refuses_training_data_that_changed(tmp_path):
    data = tmp_path / "d.csv"
    mixed_frame(200).to_csv(data, index=False)
    run = fit(tmp_path / "run", data, "label")
    (run.path / "report.json").unlink()  # as if it had stopped after its last checkpoint
    mixed_frame(200, seed=7).to_csv(data, index=False)
    with pytest.raises(DanluError, match="has changed since run"):
        danlu.train(resume=run.path, progress=False)
    assert not RunDir(run.path).is_complete()
