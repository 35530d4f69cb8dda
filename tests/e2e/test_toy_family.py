"""Adding a family is one folder plus one registry line: the toy family in tests/toy_family/ (fixed-length
sequences of numbers), registered with `danlu.families.register` and named nowhere in danlu, goes through
every stage: train (the CLI, data.family auto), resume after SIGKILL to identical weights, evaluate,
predict, export (ONNX and TorchScript, verified), serve (a real uvicorn process, the web page in
Chromium) and package (linted, and the packaged run served)."""

import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest

import danlu
from danlu import families
from tests.conftest import ROOT, same_weights, train_and_kill
from tests.e2e.test_serve_process import Server

REGISTER = "from danlu import families; families.register('sequence', 'tests.toy_family')"
# the CLI with the toy family registered first: what one line in FAMILIES does for danlu's own families
LAUNCH = ("-c", f"import sys; {REGISTER}; from danlu.cli import main; sys.exit(main(sys.argv[1:]))")
LENGTH = 8


def toy_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def sequences(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, LENGTH)).astype(np.float32)
    return x, (x[:, : LENGTH // 2].sum(axis=1) > 0).astype(np.int64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    families.register("sequence", "tests.toy_family")
    yield
    families.FAMILIES.pop("sequence")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    x, y = sequences(400, seed=0)
    np.savez(root / "train.seq.npz", sequences=x, labels=y)
    config = f"data:\n  train: {root / 'train.seq.npz'}\nmodel:\n  hidden: [16]\ntrain:\n  epochs: 20\n"
    (root / "toy.yaml").write_text(config)
    return root


@pytest.fixture(scope="module")
def run(toy, data):
    result = toy_cli("train", str(data / "toy.yaml"), "--out", str(data / "run"), cwd=data)
    assert result.returncode == 0, result.stderr
    return danlu.Run(data / "run")


def test_the_toy_family_trains_from_the_cli_and_evaluates(run):
    assert run.report["family"] == "sequence" and run.config.data.family == "sequence"  # auto-detected
    assert run.report["test"]["accuracy"] > 0.8
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(run.report["test"]["accuracy"])
    assert (run.path / "heldout.seq.npz").is_file()  # its own held-out file, recorded in the run


@pytest.mark.slow
def test_a_killed_toy_run_resumes_to_the_weights_of_an_uninterrupted_one(toy, data, tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text((data / "toy.yaml").read_text().replace("epochs: 20", "epochs: 30\n  batch_size: 16"))
    whole = toy_cli("train", str(config), "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    train_and_kill(config, tmp_path / "killed", epochs=4, danlu=LAUNCH)
    resumed = toy_cli("train", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "whole", tmp_path / "killed")


def test_predict_writes_the_families_prediction_file(run, data, tmp_path):
    x, _ = sequences(5, seed=3)
    np.savez(tmp_path / "new.seq.npz", sequences=x)
    result = toy_cli("predict", str(run.path), str(tmp_path / "new.seq.npz"), "-o", str(tmp_path / "p.csv"))
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written["row"]) == list(range(5))
    assert list(written["prediction"]) == list(danlu.load(run.path).predict(x))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_are_verified_against_the_torch_model(run, fmt, tmp_path):
    from danlu.export import export_run

    result = export_run(run.path, fmt, out=tmp_path / f"toy.{fmt}")
    assert result["split"] == "test" and result["rows"] == run.report["rows"]["test"]
    assert result["max_abs_diff"] < 1e-4 and result["metric_drop"] == 0


def test_the_server_and_its_page_predict_sequences(run):
    x, _ = sequences(3, seed=5)
    code = f"{REGISTER}; import danlu; danlu.serve({str(run.path)!r}, port={{port}})"
    server = Server(None, code=code)
    try:
        response = httpx.post(f"{server.url}/v1/predict", json={"sequences": x.tolist()}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == danlu.load(run.path).predict(x).tolist()
        short = httpx.post(f"{server.url}/v1/predict", json={"sequences": [[1.0, 2.0]]}, timeout=10)
        assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["body", "sequences", 0]
        assert httpx.get(f"{server.url}/v1/metadata", timeout=10).json()["length"] == LENGTH
        if shutil.which("chromium") and shutil.which("chromedriver"):
            shown = _page_prediction(server.url, x[0])
            assert shown == f"Prediction: {response.json()['predictions'][0]}"
    finally:
        server.stop()


def _page_prediction(url: str, sequence: np.ndarray) -> str:
    """The generic page, in headless Chromium: the family's one field of numbers, then Predict."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "sequence").send_keys(", ".join(repr(float(v)) for v in sequence))
        browser.find_element(By.ID, "predict").click()
        found = WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "prediction")))
        return found.text
    finally:
        browser.quit()


def test_package_writes_a_linted_context_whose_run_serves(run, tmp_path):
    from danlu.env.package import PackageOptions, package_run
    from tests.integration.test_package import lint

    result = package_run(run.path, tmp_path / "context", PackageOptions(gpu=False))
    lint(tmp_path / "context")
    packaged = tmp_path / "context" / "run"
    assert sorted(p.name for p in packaged.iterdir()) == [
        "config.yaml", "model.safetensors", "preprocess.json", "report.json",
    ]  # fmt: skip
    assert "heldout.seq.npz" in result["left_out"]
    x, _ = sequences(2, seed=6)
    code = f"{REGISTER}; import danlu; danlu.serve({str(packaged)!r}, port={{port}})"
    server = Server(None, code=code, pythonpath=tmp_path / "context")  # danlu from the build context
    try:
        response = httpx.post(f"{server.url}/v1/predict", json={"sequences": x.tolist()}, timeout=10)
        assert response.json()["predictions"] == danlu.load(run.path).predict(x).tolist()
        assert json.loads((packaged / "preprocess.json").read_text())["family"] == "sequence"
    finally:
        server.stop()
