"""The real `danlu` CLI in a subprocess: the commands users type, and every error case."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tests.conftest import mixed_frame, run_cli, write_config


def test_help_lists_every_verb():
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("train", "evaluate", "predict", "export", "serve", "quickstart"):
        assert verb in result.stdout


@pytest.mark.slow
def test_quickstart_reduced(tmp_path):
    result = run_cli("quickstart", "--out", str(tmp_path / "qs"), "train.epochs=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy=" in result.stdout and "predictions" in result.stdout
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert report["test"]["accuracy"] > 0.85
    predictions = pd.read_csv(tmp_path / "qs" / "predictions.csv")
    assert len(predictions) == report["rows"]["test"] == 20_000
    assert {"prediction", "proba_0", "proba_1", "proba_2", "label"} <= set(predictions.columns)
    assert skm.accuracy_score(predictions["label"], predictions["prediction"]) == pytest.approx(
        report["test"]["accuracy"]
    )


def test_overrides_alone_train_on_the_defaults_into_runs_run(tmp_path, mixed_csv):
    """No config file: `danlu train data.train=... data.target=...` as the Python API's train(None, ...);
    a stopped run takes no overrides, said as such."""
    result = run_cli("train", f"data.train={mixed_csv}", "data.target=label", "train.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "runs" / "run" / "config.yaml").read_text()
    assert f"train: {mixed_csv}" in config and "epochs: 2" in config
    assert (tmp_path / "runs" / "run" / "report.json").is_file()
    again = run_cli("train", "--resume", str(tmp_path / "runs" / "run"), "train.epochs=4", cwd=tmp_path)
    assert again.returncode == 2 and "resume takes no config, overrides or output" in again.stderr
    bare = run_cli("train", cwd=tmp_path)
    assert bare.returncode == 2 and "no config given (fix: run `danlu train CONFIG.yaml`, " in bare.stderr
    # danlu tune too: the overrides are its config (here checked, and their mistake named, at once)
    space = write_config(tmp_path / "space.yaml", "train.lr: {low: 0.001, high: 0.1}\n")
    tune = run_cli(
        "tune", f"data.train={mixed_csv}", "data.target=lable", "--space", str(space), cwd=tmp_path
    )
    assert tune.returncode == 2 and "target column 'lable' not in the data" in tune.stderr, tune.stderr


def test_train_evaluate_predict_cycle(tmp_path, mixed_csv):
    config = write_config(
        tmp_path / "mixed.yaml", f"data:\n  train: {mixed_csv}\n  target: label\ntrain:\n  epochs: 30\n"
    )
    result = run_cli("train", str(config), "model.hidden=[16]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "mixed"  # default: runs/<config name>
    assert (run_dir / "report.json").is_file()

    result = run_cli("evaluate", str(run_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"accuracy", "f1_macro", "roc_auc", "log_loss"}
    report = json.loads((run_dir / "report.json").read_text())
    assert metrics["accuracy"] == pytest.approx(report["test"]["accuracy"])

    new = mixed_frame(120, seed=5).assign(row_id=range(120))
    new.to_csv(tmp_path / "new.csv", index=False)
    result = run_cli("evaluate", str(run_dir), str(tmp_path / "new.csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout and "mid" in result.stdout
    unlabeled = new.drop(columns="label")
    unlabeled.to_csv(tmp_path / "unlabeled.csv", index=False)
    result = run_cli(
        "predict",
        str(run_dir),
        str(tmp_path / "unlabeled.csv"),
        "-o",
        str(tmp_path / "p.csv"),
        "--chunk-rows",
        "50",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = pd.read_csv(tmp_path / "p.csv")
    assert out["row_id"].tolist() == list(range(120))  # order kept, extra columns passed through
    proba = out[["proba_high", "proba_low", "proba_mid"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert out["prediction"].tolist() == list(np.array(["high", "low", "mid"])[proba.argmax(axis=1)])

    result = run_cli(
        "predict",
        str(run_dir),
        str(tmp_path / "unlabeled.csv"),
        "-o",
        str(tmp_path / "p.parquet"),
        cwd=tmp_path,
    )
    assert result.returncode == 0
    assert pd.read_parquet(tmp_path / "p.parquet")["prediction"].tolist() == out["prediction"].tolist()


def _csv(tmp_path, name, frame):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _error_cases(tmp_path):
    good = _csv(tmp_path, "good.csv", mixed_frame(60))
    stray = mixed_frame(60).astype({"x0": object})
    stray.loc[11, "x0"] = "oops"
    inf_target = pd.DataFrame({"a": np.arange(20.0), "y": np.arange(20.0)})
    inf_target.loc[3, "y"] = np.inf
    huge = mixed_frame(60)
    huge.loc[9, "x0"] = -1e307
    files = {
        "empty": _csv(tmp_path, "empty.csv", mixed_frame(3).iloc[:0]),
        "single": _csv(tmp_path, "single.csv", mixed_frame(30).assign(label="same")),
        "stray": _csv(tmp_path, "stray.csv", stray),
        "inf": _csv(tmp_path, "inf.csv", inf_target),
        "huge": _csv(tmp_path, "huge.csv", huge),
        "repeated": _csv(tmp_path, "repeated.csv", mixed_frame(30).rename(columns={"x1": "x0"})),
    }
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("x0;x1;label\n1,5;2;a\n2;3;b\n")
    bad_yaml = write_config(tmp_path / "bad.yaml", "data:\n  train: [unclosed\n")
    return {
        "missing config": (["train", str(tmp_path / "nope.yaml")], "config file"),
        "missing data file": (
            ["train", "--out", str(tmp_path / "r1"), _cfg(tmp_path, "missing.csv")],
            "data file",
        ),
        "unreadable yaml": (["train", str(bad_yaml)], "cannot parse"),
        "unknown key": (["train", _cfg(tmp_path, good), "train.epoks=3"], "did you mean 'train.epochs'"),
        "wrong type": (["train", _cfg(tmp_path, good), "train.epochs=many"], "train.epochs: Input should be"),
        "missing target": (["train", _cfg(tmp_path, good), "data.target=price"], "target column 'price'"),
        "empty dataset": (["train", _cfg(tmp_path, files["empty"])], "no data rows"),
        "single class": (["train", _cfg(tmp_path, files["single"])], "single class"),
        "stray text": (
            ["train", _cfg(tmp_path, files["stray"])],
            "column 'x0' holds numbers but row 12 has 'oops'",
        ),
        "value beyond float32": (
            ["train", _cfg(tmp_path, files["huge"])],
            "column 'x0' has -1e+307 at row 10, beyond float32's range",
        ),
        "semicolons": (["train", _cfg(tmp_path, semicolons)], "is separated by ';', not commas"),
        "repeated column": (["train", _cfg(tmp_path, files["repeated"])], "'x0' (columns 1 and 2)"),
        "inf target": (
            ["train", _cfg(tmp_path, files["inf"], target="y")],
            "target column 'y' has inf at row 4",
        ),
        "custom model import": (
            ["train", _cfg(tmp_path, good), "model.target=no_such_pkg.models:Net"],
            "cannot import module 'no_such_pkg.models'",
        ),
        "control characters": (
            ["train", _cfg(tmp_path, good), "train.epo\nchs\x1b[2J=3"],  # stays one line, escapes shown
            "unknown key 'train.epo\\nchs\\x1b[2J'",
        ),
        "evaluate missing run": (["evaluate", str(tmp_path / "no_run")], "does not exist"),
        "resume missing run": (["train", "--resume", str(tmp_path / "no_run")], "not a run directory"),
    }


def _cfg(tmp_path, data, target="label"):
    path = tmp_path / f"cfg_{abs(hash((str(data), target)))}.yaml"
    write_config(
        path, f"data:\n  train: {data}\n  target: {target}\ntrain:\n  epochs: 1\noutput: {tmp_path}/r\n"
    )
    return str(path)


CASES = [
    "missing config",
    "missing data file",
    "unreadable yaml",
    "unknown key",
    "wrong type",
    "missing target",
    "empty dataset",
    "single class",
    "stray text",
    "inf target",
    "repeated column",
    "semicolons",
    "value beyond float32",
    "custom model import",
    "control characters",
    "evaluate missing run",
    "resume missing run",
]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_exit_2_no_traceback(tmp_path, case):
    args, expected = _error_cases(tmp_path)[case]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("danlu: error: ") and expected in lines[0], lines[0]
    assert "(fix: " in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import train_quietly

    return train_quietly(
        tmp_path_factory.mktemp("finished") / "run", mixed_frame(200), "label", "train.epochs=2"
    )


DAMAGED_FILES = [  # a file of a finished run cut short, and a command that reads it
    ("report.json", ["evaluate", "RUN"]),
    ("report.json", ["runs", "compare", "RUN", "RUN"]),
    ("preprocess.json", ["predict", "RUN", "DATA", "-o", "out.csv"]),
    ("preprocess.json", ["export", "RUN"]),
    ("heldout.json", ["evaluate", "RUN"]),
    ("model.safetensors", ["predict", "RUN", "DATA", "-o", "out.csv"]),
]


@pytest.mark.parametrize(("name", "args"), DAMAGED_FILES, ids=lambda v: v if isinstance(v, str) else v[0])
def test_a_run_file_cut_short_is_one_line_naming_it(tmp_path, finished_run, name, args):
    """danlu writes a run's files atomically, so one cut short was damaged since (a copy that stopped):
    named in one line with the fix, exit 2, not a JSONDecodeError's traceback."""
    import shutil

    run = shutil.copytree(finished_run.path, tmp_path / "run")
    data = finished_run.path.parent / f"{finished_run.path.name}.csv"
    (run / name).write_bytes((run / name).read_bytes()[:20])
    result = run_cli(*[{"RUN": str(run), "DATA": str(data)}.get(a, a) for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("danlu: error: cannot ") and f"'{run / name}'" in line, line
    assert line.endswith("(fix: the run directory is damaged: restore the file or train again)"), line
    assert not (tmp_path / "out.csv").exists()


def main_in_a_fresh_interpreter(args: list[str]) -> subprocess.CompletedProcess:
    """danlu.cli.main(ARGS) in a new Python; its stdout: the exit code, then whether torch was imported."""
    code = f"import sys; from danlu.cli import main; print(main({args!r}), 'torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_config_and_run_directory_mistakes_are_reported_before_torch_loads(tmp_path):
    bad_key = _cfg(tmp_path, tmp_path / "data.csv")
    (tmp_path / "data.csv").write_text("x,label\n1,a\n")  # exists, so each case is refused for its own
    run = tmp_path / "run"  # a finished run, as far as a check before torch can tell
    run.mkdir()
    (run / "report.json").write_text("{}")
    (tmp_path / "thesis.txt").write_text("mine")
    clip = tmp_path / "clip"  # an image-text model, as far as its config tells
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    pics = str(tmp_path / "pics")
    llm = tmp_path / "llm"  # a causal LM, as far as its config tells
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    for args in (
        ["train", str(tmp_path / "nope.yaml")],
        ["train", bad_key, "train.epoch=3"],
        ["train", bad_key, "train.strategy=deepspeed", "--out", str(tmp_path / "one")],  # needs --nproc 2+
        ["train", "--resume", str(tmp_path / "no_run")],
        ["evaluate", str(tmp_path / "no_run")],
        ["predict", str(tmp_path / "no_run"), "new.csv", "-o", "out.csv"],
        ["export", str(tmp_path / "no_run")],
        ["export", str(run), "-o", str(tmp_path)],  # a folder
        ["export", str(run), "-o", str(tmp_path / "thesis.txt")],  # a file danlu did not write
        ["serve", str(tmp_path / "no_run")],
        ["serve", str(run), "--port", "99999"],  # no port: the system would bind 34463
        ["serve", str(run), "--port", str(taken.getsockname()[1])],  # a port in use: before the model loads
        ["serve", str(llm), "--port", str(taken.getsockname()[1])],
        ["serve", "org/model"],  # a hub id: danlu never downloads
        ["serve", str(tmp_path / "missing.gguf")],
        ["chat", "org/model", "--prompt", "hi"],
        ["chat", str(llm), "--prompt", "hi", "--max-tokens", "0"],
        ["chat", str(llm), "--prompt", "hi", "--temperature", "-1"],
        ["chat", str(llm), "--prompt", "hi", "--engine", "vllm", "--kv-cache-gb", "0"],
        ["serve", str(llm), "--engine", "vllm", "--max-model-len", "0"],
        ["serve", str(llm), "--engine", "vllm", "--tensor-parallel", "0"],
        ["embed", "org/model", pics, "-o", str(tmp_path / "v.npy")],
        ["embed", str(clip), pics, "-o", str(tmp_path / "v.csv")],  # vectors go to .npy or .parquet
        ["predict", str(clip), pics, "-o", str(tmp_path / "l.csv")],  # no labels
        ["predict", str(clip), pics, "-o", str(tmp_path / "l.csv"), "--labels", "cat,cat"],
        ["predict", str(clip), pics, "-o", str(tmp_path / "l.csv"), "--labels", "cat", "--template", "cat"],
    ):
        result = main_in_a_fresh_interpreter(args)
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)
    taken.close()


def test_a_mistyped_column_is_named_before_torch_loads(tmp_path):
    """A column the training file's header lacks (data.target, features, text, image) is one line with the
    nearest name, before torch, the data load, or any process launched (--nproc, tune)."""
    data = tmp_path / "data.csv"
    data.write_text("x,label\n1,a\n")
    config = _cfg(tmp_path, data)
    space = write_config(tmp_path / "space.yaml", "train.lr: {low: 0.001, high: 0.1, log: true}\n")
    for args in (
        ["train", config, "data.target=lable", "--out", str(tmp_path / "a")],
        ["train", config, "data.target=lable", "--out", str(tmp_path / "b"), "--nproc", "2"],
        ["tune", config, "data.target=lable", "--space", str(space), "--out", str(tmp_path / "c")],
    ):
        result = main_in_a_fresh_interpreter(args)
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert line == (
            "danlu: error: target column 'lable' not in the data "
            "(fix: did you mean 'label'? available columns: x, label)"
        ), line
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_file_without_rows_and_a_validation_file_without_the_column_are_named_before_torch(tmp_path):
    """The other data files are checked as the training file is, and a file with no data rows or another
    separator too: one line each, before torch or any process launched."""
    data, headed, empty, other = (tmp_path / n for n in ("data.csv", "headed.csv", "empty.csv", "other.csv"))
    data.write_text("x,label\n1,a\n")
    headed.write_text("x,label\n")
    empty.write_text("")
    other.write_text("x,class\n1,a\n")
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("x;label\n1;a\n")
    config = _cfg(tmp_path, data)
    for args, expected in (
        (["train", _cfg(tmp_path, headed), "--nproc", "2"], f"'{headed}' has no data rows"),
        (["train", _cfg(tmp_path, empty)], f"'{empty}' is empty"),
        (
            ["train", config, f"data.validation={other}"],
            f"target column 'label' not in data.validation '{other}'",
        ),
        (["train", config, f"data.test={headed}"], f"'{headed}' has no data rows"),
        (["train", config, f"data.validation={semicolons}"], f"'{semicolons}' is separated by ';'"),
    ):
        result = main_in_a_fresh_interpreter([*args, "--out", str(tmp_path / "run")])
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)
        assert result.stderr.startswith("danlu: error: " + expected), result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_missing_data_file_is_named_before_torch_loads(tmp_path):
    """A mistyped data path (train, validation or test; for train, tune, and a resumed run whose data
    moved) is one line naming the key and the path, before torch and the data load."""
    data = tmp_path / "data.csv"
    data.write_text("x,label\n1,a\n")
    config, missing = _cfg(tmp_path, data), tmp_path / "gone.csv"
    space = write_config(tmp_path / "space.yaml", "train.lr: {low: 0.001, high: 0.1, log: true}\n")
    stopped = tmp_path / "stopped"  # a stopped run, as far as a check before torch can tell
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "last.pt").write_bytes(b"")
    (stopped / "config.yaml").write_text(Path(_cfg(tmp_path, missing)).read_text())
    for args, key in (
        (["train", _cfg(tmp_path, missing), "--out", str(tmp_path / "a")], "train"),
        (["train", config, f"data.validation={missing}", "--out", str(tmp_path / "b")], "validation"),
        (["train", config, f"data.test={missing}", "--out", str(tmp_path / "c")], "test"),
        (["tune", _cfg(tmp_path, missing), "--space", str(space), "--out", str(tmp_path / "d")], "train"),
        (["train", "--resume", str(stopped)], "train"),
    ):
        result = main_in_a_fresh_interpreter(args)
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert line == (
            f"danlu: error: data file (data.{key}) '{missing}' not found "
            "(fix: check the path in the config or on the command line)"
        ), line


def test_server_limits_out_of_range_are_one_line_before_torch_loads(tmp_path):
    """Each server's settings are checked before torch, transformers or the model load: a causal LM
    directory whose weights would fail to load, a .gguf file that is none, an encoder and a finished run."""
    chat, encoder, run = tmp_path / "chat", tmp_path / "encoder", tmp_path / "run"
    for folder, config in ((chat, "LlamaForCausalLM"), (encoder, "BertModel")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [config]}))
        (folder / "model.safetensors").write_bytes(b"not weights")  # loading it would fail differently
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    run.mkdir()
    (run / "report.json").write_text("{}")
    chat_limits = ["max-batch", "max-queue", "prefill-chunk", "timeout", "max-batch-tokens"]
    cases = [(model, name, "0", name) for model in (chat, tmp_path / "model.gguf") for name in chat_limits]
    cases += [(encoder, "max-batch", "0", "max-batch"), (encoder, "max-wait-ms", "-1", "max-wait-ms")]
    cases += [(encoder, "max-body-mb", "0", "--max-body-mb (max_body_bytes)")]
    cases += [(run, "max-queue", "0", "--max-queue (max_queue_rows)")]
    cases += [(run, "max-wait-ms", "-1", "max-wait-ms"), (run, "timeout", "0", "timeout")]
    cases += [(run, "max-batch", "0", "max-batch")]
    for model, option, value, named in cases:
        args = ["serve", str(model), f"--{option}", value, "--port", "1"]
        result = main_in_a_fresh_interpreter(args)
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line and f"{named} must be" in line, (args, line)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "DanluError" in result.stderr


def test_stray_text_trains_when_declared_categorical(tmp_path):
    frame = mixed_frame(60).astype({"x0": object})
    frame.loc[11, "x0"] = "oops"
    path = _csv(tmp_path, "stray.csv", frame)
    result = run_cli("train", _cfg(tmp_path, path), "data.categorical=[x0]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_predict_names_missing_columns(tmp_path, mixed_csv):
    run_dir = tmp_path / "run"
    assert run_cli("train", _cfg(tmp_path, mixed_csv), "--out", str(run_dir), cwd=tmp_path).returncode == 0
    mixed_frame(10).drop(columns=["x1", "color"]).to_csv(tmp_path / "partial.csv", index=False)
    result = run_cli("predict", str(run_dir), str(tmp_path / "partial.csv"), "-o", str(tmp_path / "o.csv"))
    assert result.returncode == 2
    assert "missing required columns: x1, color" in result.stderr
    assert not (tmp_path / "o.csv").exists()  # no partial output
