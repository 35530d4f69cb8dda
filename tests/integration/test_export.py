import json
import subprocess
import sys

import numpy as np
import pytest

import danlu
from danlu.errors import DanluError
from danlu.export import FP32_TOLERANCE, export_run
from danlu.run import RunDir
from tests.conftest import mixed_frame, priced_frame, train_quietly


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {
        "classification": train_quietly(root / "cls", mixed_frame(400), "label", "train.epochs=30"),
        "regression": train_quietly(root / "reg", priced_frame(400), "price", "train.epochs=30"),
    }


def new_rows(task):
    """Fresh rows with a missing number and an unseen category, as a server would get them."""
    frame = (mixed_frame(60, seed=5) if task == "classification" else priced_frame(60, seed=5)).copy()
    frame.iloc[0, 0] = np.nan
    column = "color" if task == "classification" else "zone"
    frame.loc[1, column] = "never-seen"
    return frame


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_fp32_export_matches_the_torch_model(runs, task, fmt):
    run = runs[task]
    result = export_run(run.path, fmt)
    assert result["max_abs_diff"] <= FP32_TOLERANCE and result["rows"] == run.report["rows"]["test"]
    path = RunDir(run.path).export_path(fmt)
    assert (
        path.is_file()
        and json.loads(path.with_name(path.name + ".json").read_text())["rows"] == result["rows"]
    )
    torch_predictor = danlu.load(run.path)
    if fmt == "onnx":  # the onnx engine of Predictor runs the exported file
        exported = danlu.load(run.path, engine="onnx").decoded(new_rows(task))
    else:
        from danlu.runners import TorchScriptRunner

        spec = torch_predictor.family.exporter(torch_predictor.state)
        exported = TorchScriptRunner(path, spec).run(new_rows(task))
    expected = torch_predictor.decoded(new_rows(task))
    scale = 1.0 if task == "classification" else torch_predictor.preprocessor.target_std
    assert np.abs(exported - expected).max() / scale <= FP32_TOLERANCE


def test_danlu_export_is_the_cli_verb_in_python(runs, tmp_path):
    run = runs["classification"]
    out = tmp_path / "model.pt"
    result = danlu.export(run.path, format="torchscript", out=out)
    assert result["export"] == "run" and result["path"] == str(out) and out.is_file()
    assert result["max_abs_diff"] <= FP32_TOLERANCE
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record == {key: value for key, value in result.items() if key != "export"}
    # what does not fit the source is one DanluError, before torch is imported, as from the CLI
    calls = {
        "quantize='q8_0'": "--quantize q8_0 is a GGUF type",
        "quantize='int4'": "unknown quantization 'int4'",
        "format='gguf', quantize='int8'": "--quantize int8 is for onnx and torchscript",
        "format='gguf', quantize='q5'": "unknown GGUF type 'q5'",
        "format='tflite'": "unknown export format 'tflite'",
    }
    code = "import sys, danlu\n" + "".join(
        f"try:\n    danlu.export({str(run.path)!r}, {options})\nexcept danlu.DanluError as e:\n    print(e)\n"
        for options in calls
    )
    code += "print('torch' in sys.modules)\n"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = ran.stdout.splitlines()
    assert len(lines) == len(calls) + 1, ran.stderr
    for line, expected in zip(lines, calls.values(), strict=False):
        assert line.startswith(expected), line
    assert lines[-1] == "False"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_int8_export_reports_the_metric_change_and_enforces_the_limit(runs, fmt):
    run = runs["classification"]
    # 80 test rows: one row is 1.25 points of accuracy, so this tiny run gets a looser limit
    result = export_run(run.path, fmt, "int8", max_metric_drop=0.05)
    assert result["metric"] == "accuracy" and result["metric_drop"] <= 0.05
    assert result["metric_drop"] == pytest.approx(result["torch"] - result["exported"])
    assert result["torch"] == pytest.approx(run.report["test"]["accuracy"])
    out = run.path / "strict" / f"model{fmt}"
    with pytest.raises(DanluError, match="nothing was written"):
        export_run(run.path, fmt, "int8", out=out, max_metric_drop=-1.0)  # no loss is ever below -1
    assert not out.exists()


def test_onnx_file_runs_with_only_onnxruntime_and_numpy(runs):
    run = runs["classification"]
    export_run(run.path, "onnx")
    script = f"""
import json, sys
import numpy as np, onnx, onnxruntime as ort
path = {str(RunDir(run.path).export_path("onnx"))!r}
model = onnx.load(path)
onnx.checker.check_model(model, full_check=True)
meta = {{p.key: p.value for p in model.metadata_props}}
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
numeric = np.array([[0.5, np.nan], [-1.0, 0.3], [2.0, -0.5]], dtype=np.float32)
color = np.array(["red", "blue", "purple"], dtype=object)
(proba,) = session.run(None, {{"numeric": numeric, "color": color}})
assert "torch" not in sys.modules and "danlu" not in sys.modules
print(json.dumps({{"meta": meta, "proba": proba.tolist(), "inputs": [i.name for i in session.get_inputs()]}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["inputs"] == ["numeric", "color"]
    assert json.loads(out["meta"]["classes"]) == ["high", "low", "mid"]
    assert json.loads(out["meta"]["numeric_features"]) == ["x0", "x1"]
    assert out["meta"]["danlu_version"] == danlu.__version__
    proba = np.array(out["proba"])
    assert proba.shape == (3, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    frame = mixed_frame(3).drop(columns="label")
    frame["x0"], frame["x1"], frame["color"] = (
        [0.5, -1.0, 2.0],
        [np.nan, 0.3, -0.5],
        ["red", "blue", "purple"],
    )
    assert np.allclose(proba, danlu.load(run.path).decoded(frame), atol=FP32_TOLERANCE)


def test_onnx_engine_without_an_export_names_the_fix(tmp_path):
    run = train_quietly(tmp_path / "fresh", mixed_frame(200), "label", "train.epochs=2")
    with pytest.raises(DanluError, match="danlu export"):
        danlu.load(run.path, engine="onnx")
