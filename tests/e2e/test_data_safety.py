"""Through the real CLI: danlu never deletes what it did not write, never ends a run with a traceback, and
every JSON file it writes is strict."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import mixed_frame, run_cli, train_quietly, write_config


def snapshot(folder):
    """Every path under folder with its bytes (None for directories)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def users_folder(path):
    """A folder with a user's file and a subfolder holding another."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "data").mkdir()
    (path / "data" / "raw.csv").write_text("a,b\n1,2\n")
    return path


def assert_refused(result, folder, before, mentions):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("danlu: error: "), result.stderr
    assert mentions in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(folder) == before  # nothing touched


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return train_quietly(
        tmp_path_factory.mktemp("safety") / "run", mixed_frame(200), "label", "train.epochs=2"
    )


def config_for(tmp_path, finished):
    data = finished.path.parent / f"{finished.path.name}.csv"
    return str(
        write_config(tmp_path / "cfg.yaml", f"data:\n  train: {data}\n  target: label\ntrain:\n  epochs: 1\n")
    )


@pytest.mark.parametrize("where", ["named", "cwd"])
@pytest.mark.parametrize("verb", ["quickstart", "train --overwrite"])
def test_a_users_folder_is_never_replaced_by_a_run(tmp_path, finished, verb, where):
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    out = str(folder) if where == "named" else "."
    args = ["quickstart", "--out", out] if verb == "quickstart" else ["train", config_for(tmp_path, finished)]
    if verb != "quickstart":
        args += ["--out", out, "--overwrite"]
    assert_refused(run_cli(*args, cwd=folder), folder, before, "is not a danlu run")


def test_export_never_replaces_a_users_folder_or_file(tmp_path, finished):
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    assert_refused(run_cli("export", str(finished.path), "-o", str(folder)), folder, before, "is a directory")
    result = run_cli("export", str(finished.path), "-o", str(folder / "thesis.txt"))
    assert_refused(result, folder, before, "was not written by `danlu export`")
    # its own earlier export is replaced, as a re-export should
    target = tmp_path / "model.onnx"
    for _ in range(2):
        assert run_cli("export", str(finished.path), "-o", str(target)).returncode == 0
    assert json.loads((tmp_path / "model.onnx.json").read_text())["format"] == "onnx"


def test_package_never_writes_into_a_users_folder(tmp_path, finished):
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    assert_refused(run_cli("package", str(finished.path), "--out", str(folder)), folder, before, "not empty")
    assert_refused(
        run_cli("package", str(finished.path), "--out", str(folder / "thesis.txt")),
        folder,
        before,
        "is a file",
    )


def strict(text):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_one_held_out_row_completes_and_every_json_is_strict(tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=20), "y": rng.normal(size=20)}).to_csv(tmp_path / "d.csv", index=False)
    cfg = write_config(
        tmp_path / "tiny.yaml",
        f"data:\n  train: {tmp_path / 'd.csv'}\n  target: y\n  val_fraction: 0.05\n  test_fraction: 0.05\n"
        "train:\n  epochs: 3\n",
    )
    run_dir = tmp_path / "run"
    result = run_cli("train", str(cfg), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert run_cli("export", str(run_dir)).returncode == 0
    evaluated = run_cli("evaluate", str(run_dir), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert strict(evaluated.stdout)["r2"] is None
    report = strict((run_dir / "report.json").read_text())
    assert report["rows"]["test"] == 1 and report["test"]["r2"] is None
    assert "at least 2 rows" in report["test"]["undefined"]["r2"]
    files = [*run_dir.glob("*.json"), *run_dir.glob("export/*.json")]
    assert {f.name for f in files} >= {"report.json", "preprocess.json", "heldout.json", "model.onnx.json"}
    for path in files:
        strict(path.read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(strict(line)["val_r2"] is None for line in lines)


def test_a_constant_target_and_a_diverging_run_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.csv"
    pd.DataFrame({"a": rng.normal(size=50), "y": 2.5}).to_csv(data, index=False)
    cfg = write_config(tmp_path / "c.yaml", f"data:\n  train: {data}\n  target: y\ntrain:\n  epochs: 3\n")
    result = run_cli("train", str(cfg), "--out", str(tmp_path / "const"))
    assert result.returncode == 2 and "target 'y' has a single value 2.5" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "const").exists()

    pd.DataFrame({"a": rng.normal(size=50) * 1e3, "y": rng.normal(size=50)}).to_csv(data, index=False)
    result = run_cli(
        "train", str(cfg), "--out", str(tmp_path / "diverged"), "train.optimizer=sgd", "train.lr=1e30"
    )
    assert result.returncode == 2, result.stderr
    assert "training diverged" in result.stderr and "lower train.lr" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "diverged" / "report.json").exists()  # never looks complete


def test_overwrite_replaces_a_run_holding_only_danlus_files_and_keeps_users_files_in_its_folders(
    tmp_path, finished
):
    """A run with a file of the user's at its top is not replaced. A run's plots/, export/ and
    checkpoints/ are danlu's folders, but a user may put files there: `--overwrite` deletes the plots
    danlu drew (its PNGs carry danlu's tag), the exports with danlu's record beside them and its
    checkpoints, and keeps everything else as it was."""
    cfg = config_for(tmp_path, finished)
    run_dir = tmp_path / "run"
    shutil.copytree(finished.path, run_dir)  # a finished run of 2 epochs
    (run_dir / "my_notes.md").write_text("observations")
    before = snapshot(run_dir)
    result = run_cli("train", cfg, "--out", str(run_dir), "--overwrite")
    assert_refused(result, run_dir, before, "files danlu did not write (my_notes.md)")
    (run_dir / "my_notes.md").unlink()
    assert run_cli("export", str(run_dir)).returncode == 0
    mine = {
        "plots/notes.txt": b"what I saw",
        "plots/my_chart.png": (run_dir / "plots" / "learning_curves.png").read_bytes()[:8] + b"mine",
        "export/colleague.onnx": b"an export of someone else's",
        "checkpoints/epoch3-backup.pt": b"my own copy",
    }
    for name, data in mine.items():
        (run_dir / name).write_bytes(data)
    danlus = [run_dir / "plots" / "learning_curves.png", run_dir / "export" / "model.onnx"]
    stamps = {p: p.stat().st_mtime_ns for p in danlus}
    result = run_cli("train", cfg, "--out", str(run_dir), "--overwrite", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    for name, data in mine.items():
        assert (run_dir / name).read_bytes() == data, name
    assert not (run_dir / "export" / "model.onnx").exists()  # danlu's export of the old run is gone
    assert (run_dir / "plots" / "learning_curves.png").stat().st_mtime_ns != stamps[danlus[0]]  # redrawn
    assert json.loads((run_dir / "report.json").read_text())["epochs_run"] == 3
