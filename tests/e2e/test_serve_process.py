"""`danlu serve` and `danlu export` as real processes: uvicorn on a free port, SIGTERM, the CLI output."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.conftest import ROOT, mixed_frame, run_cli, train_quietly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m danlu serve RUN --port P ...` until stopped; ready once /readyz answers 200."""

    def __init__(
        self, run_dir: Path, *args: str, python: str = sys.executable, pythonpath: Path | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(pythonpath or ROOT / "tests")}
        self.process = subprocess.Popen(
            [python, "-m", "danlu", "serve", str(run_dir), "--port", str(self.port), *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"danlu serve exited: {self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("danlu serve did not become ready in 60 s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_quietly(
        tmp_path_factory.mktemp("proc") / "cls", mixed_frame(400), "label", "train.epochs=20"
    )


def test_real_server_predicts_and_exits_cleanly_on_sigterm(run):
    server = Server(run.path)
    try:
        record = {"x0": 0.1, "x1": -0.2, "color": "green"}
        response = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=10)
        assert response.status_code == 200 and response.json()["predictions"][0] in ("high", "low", "mid")
        assert "danlu_requests_total" in httpx.get(f"{server.url}/metrics").text
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert "Traceback" not in server.process.stdout.read()


def test_sigterm_finishes_the_request_in_flight(tmp_path):
    slow = train_quietly(
        tmp_path / "slow",
        mixed_frame(200),
        "label",
        "train.epochs=1",
        "model.target=tests.custom_models:Slow",
        "model.kwargs={seconds: 0}",
    )
    config = (slow.path / "config.yaml").read_text().replace("seconds: 0", "seconds: 1.5")
    (slow.path / "config.yaml").write_text(config)  # the same weights; each forward pass now takes 1.5 s
    server = Server(slow.path)
    outcome = {}

    def call():
        record = {"x0": 0.1, "x1": -0.2, "color": "green"}
        outcome["response"] = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=30)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the request is inside the model now
    started = time.monotonic()
    code = server.stop()
    caller.join(timeout=30)
    assert outcome["response"].status_code == 200
    assert outcome["response"].json()["predictions"][0] in ("high", "low", "mid")
    assert time.monotonic() - started >= 0.5  # the server waited for it
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_serve_refuses_a_bad_run_directory_in_one_line(tmp_path):
    result = run_cli("serve", str(tmp_path / "missing"), "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_export_cli_verifies_and_predict_uses_the_onnx_engine(run, tmp_path):
    result = run_cli("export", str(run.path), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    assert "max abs difference" in result.stdout and "verified" in result.stdout
    data = tmp_path / "new.csv"
    mixed_frame(100, seed=4).drop(columns="label").to_csv(data, index=False)
    outputs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        result = run_cli("predict", str(run.path), str(data), "-o", str(out), "--engine", engine)
        assert result.returncode == 0, result.stderr
        outputs[engine] = pd.read_csv(out)
    assert (outputs["torch"]["prediction"] == outputs["onnx"]["prediction"]).all()
    proba = [c for c in outputs["torch"].columns if c.startswith("proba_")]
    assert (outputs["torch"][proba] - outputs["onnx"][proba]).abs().to_numpy().max() <= 1e-4
    report = json.loads((run.path / "export" / "model.onnx.json").read_text())
    assert report["max_abs_diff"] <= 1e-4


def test_two_worker_processes_serve_the_same_model(run):
    server = Server(run.path, "--workers", "2")
    try:
        record = {"x0": 0.1, "x1": -0.2, "color": "green"}
        answers = {
            json.dumps(httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=10).json())
            for _ in range(6)
        }
        assert len(answers) == 1  # every worker loaded the same run and answers the same
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
