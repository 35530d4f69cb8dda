"""The text family as a user meets it: the real CLI (train, evaluate, predict, export) on a YAML config,
a real uvicorn server taking {"texts": [...]}, the page's text area in headless Chromium, and two
torchrun processes training to the weights of one."""

import json

import httpx
import pandas as pd
import pytest

from tests.conftest import run_cli, same_weights, train_and_kill, write_config
from tests.e2e.test_serve_process import Server
from tests.e2e.test_web_page import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401 (a fixture)
from tests.texts import reviews, tiny_encoder


@pytest.fixture(scope="module")
def text_cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_cli")
    tiny_encoder(root / "bert")
    reviews(240).to_csv(root / "reviews.csv", index=False)
    config = write_config(
        root / "reviews.yaml",
        "data:\n  train: reviews.csv\n  text: review\n  target: label\n  max_length: 64\n"
        "model:\n  pretrained: bert\ntrain:\n  epochs: 10\n  lr: 0.003\n  batch_size: 16\n",
    )
    result = run_cli("train", str(config), "--out", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "accuracy=" in result.stdout
    return root / "run"


def test_cli_trains_evaluates_predicts_and_exports_texts(text_cli_run, tmp_path):
    report = json.loads((text_cli_run / "report.json").read_text())
    assert report["family"] == "text" and report["test"]["accuracy"] > 0.9
    config = (text_cli_run / "config.yaml").read_text()
    assert "family: text" in config and str(text_cli_run.parent / "bert") in config  # an absolute path
    evaluated = run_cli("evaluate", str(text_cli_run), "--json")
    assert (
        evaluated.returncode == 0 and json.loads(evaluated.stdout)["accuracy"] == report["test"]["accuracy"]
    )

    new = tmp_path / "new.csv"
    pd.DataFrame({"review": ["superb and charming", "dull plot, awful acting"]}).to_csv(new, index=False)
    out = tmp_path / "p.csv"
    result = run_cli("predict", str(text_cli_run), str(new), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(out)["prediction"].tolist() == ["pos", "neg"]

    exported = run_cli("export", str(text_cli_run))
    assert exported.returncode == 0, exported.stderr
    assert "verified" in exported.stdout and (text_cli_run / "export" / "model.onnx").is_file()


def test_bad_text_configs_are_one_line_with_exit_2(text_cli_run, tmp_path):
    root = text_cli_run.parent
    cases = {
        "data.text=stars": "holds numbers",
        "data.max_length=512": "beyond the 64 positions",
        "model.pretrained=sentence-transformers/all-MiniLM-L6-v2": "hub id",
    }
    for override, message in cases.items():
        result = run_cli(
            "train", str(root / "reviews.yaml"), "--out", str(tmp_path / "x"), override, cwd=root
        )
        assert result.returncode == 2 and message in result.stderr, (override, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x" / "report.json").exists()


def test_the_server_predicts_texts_and_refuses_bad_ones(text_cli_run):
    server = Server(text_cli_run)
    try:
        url = f"{server.url}/v1/predict"
        texts = ["a great, charming film", "boring and dull", "电影很好看 😀", ""]
        response = httpx.post(url, json={"texts": texts}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["predictions"][:2] == ["pos", "neg"] and len(body["probabilities"]) == 4
        for bad, where in (({"texts": ["fine", 3]}, 1), ({"texts": ["ok", "x" * 20_001]}, 1)):
            response = httpx.post(url, json=bad, timeout=30)
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
                "body",
                "texts",
                where,
            ]
        assert httpx.post(url, json={"texts": []}, timeout=30).status_code == 422
        metadata = httpx.get(f"{server.url}/v1/metadata", timeout=10).json()
        assert metadata["family"] == "text" and metadata["column"] == "review"
    finally:
        server.stop()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (make setup)")
def test_the_page_has_a_text_area_that_predicts(text_cli_run, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(text_cli_run)
    try:
        browser.get(server.url + "/")
        area = browser.find_element(By.ID, "text")
        assert area.tag_name == "textarea"
        area.send_keys("what a superb and delightful story")
        browser.find_element(By.ID, "predict").click()
        shown = (
            WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "prediction"))).text
        )
        expected = httpx.post(
            f"{server.url}/v1/predict", json={"texts": ["what a superb and delightful story"]}, timeout=30
        ).json()
        assert shown == f"Prediction: {expected['predictions'][0]}" == "Prediction: pos"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".bar-row")) == 2
    finally:
        server.stop()


@pytest.mark.slow
def test_two_processes_fine_tune_to_the_weights_of_one(tmp_path):
    import torch
    from safetensors.torch import load_file

    import danlu

    tiny_encoder(tmp_path / "bert", dropout=0.0)  # dropout masks differ per rank by design
    reviews(96).to_csv(tmp_path / "r.csv", index=False)
    config = write_config(
        tmp_path / "c.yaml",
        f"data:\n  train: {tmp_path / 'r.csv'}\n  text: review\n  target: label\n  max_length: 64\n"
        f"model:\n  pretrained: {tmp_path / 'bert'}\n"
        "train:\n  epochs: 2\n  batch_size: 16\n  device: cpu\n  precision: fp32\n",
    )
    danlu.train(config, out=tmp_path / "one", progress=False)  # in this process: no imports to wait for
    result = run_cli("-q", "train", str(config), "--out", str(tmp_path / "two"), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6) for k in one)


@pytest.mark.slow
def test_a_text_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    import danlu

    tiny_encoder(tmp_path / "bert")  # dropout on: the RNG state must come back too
    reviews(96).to_csv(tmp_path / "r.csv", index=False)
    config = write_config(
        tmp_path / "c.yaml",
        f"data:\n  train: {tmp_path / 'r.csv'}\n  text: review\n  target: label\n  max_length: 64\n"
        f"model:\n  pretrained: {tmp_path / 'bert'}\n"
        "train:\n  epochs: 15\n  batch_size: 16\n  precision: fp32\n",
    )
    full = danlu.train(config, out=tmp_path / "full", progress=False).path
    killed = tmp_path / "killed"
    train_and_kill(config, killed, epochs=3)
    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert same_weights(full, killed), "resumed weights differ from the uninterrupted run"
