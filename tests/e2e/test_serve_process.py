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
    """`python -m danlu serve RUN --port P ...` until stopped; ready once /readyz answers 200. With
    `code`, `python -c CODE` instead, with the port in CODE's place of {port}."""

    def __init__(
        self,
        run_dir: Path | None,
        *args: str,
        python: str = sys.executable,
        pythonpath: Path | None = None,
        code: str | None = None,
        ready_s: float = 60,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(pythonpath or ROOT / "tests")}
        command = [python, "-m", "danlu", "serve", str(run_dir), "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            command if code is None else [python, "-c", code.replace("{port}", str(self.port))],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + ready_s
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
        raise RuntimeError(f"danlu serve did not become ready in {ready_s:.0f} s")

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


def slow_run(tmp_path, seconds):
    """A run whose model sleeps `seconds` in every forward pass (trained fast, then its config edited)."""
    slow = train_quietly(
        tmp_path / "slow",
        mixed_frame(200),
        "label",
        "train.epochs=1",
        "model.target=tests.custom_models:Slow",
        "model.kwargs={seconds: 0}",
    )
    config = (slow.path / "config.yaml").read_text().replace("seconds: 0", f"seconds: {seconds}")
    (slow.path / "config.yaml").write_text(config)  # the same weights, a slower forward pass
    return slow


def test_sigterm_finishes_the_request_in_flight(tmp_path):
    slow = slow_run(tmp_path, seconds=1.5)
    server = Server(slow.path, "--trust-model-code")
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


def test_danlu_serve_from_python_starts_a_run_server_or_a_chat_server(run, tmp_path):
    from tests.chat_models import tiny_llama

    record = {"x0": 0.1, "x1": -0.2, "color": "green"}
    server = Server(None, code=f"import danlu; danlu.serve({str(run.path)!r}, port={{port}}, max_rows=2)")
    try:
        response = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=10)
        assert response.status_code == 200 and response.json()["predictions"][0] in ("high", "low", "mid")
        too_many = httpx.post(f"{server.url}/v1/predict", json={"records": [record] * 3}, timeout=10)
        assert too_many.status_code == 422  # the settings reached the server
    finally:
        assert server.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    model = tiny_llama(tmp_path / "tiny")
    server = Server(None, code=f"import danlu; danlu.serve({str(model)!r}, port={{port}}, max_tokens=8)")
    try:
        body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] <= 8
    finally:
        assert server.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


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


def _environments(pid):
    """The environment and command line of a process, then of every process it started."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [(Path(f"/proc/{p.pid}/environ").read_bytes(), " ".join(p.cmdline())) for p in processes]


@pytest.mark.parametrize("source", ["file", "env"])
def test_the_api_key_stays_out_of_the_command_line_and_the_workers_environments(run, tmp_path, source):
    key = "k3y-" + os.urandom(8).hex()
    if source == "file":
        (tmp_path / "key").write_text(key + "\n")
        server = Server(run.path, "--workers", "2", "--api-key-file", str(tmp_path / "key"))
    else:
        os.environ["DANLU_API_KEY"] = key
        try:
            server = Server(run.path, "--workers", "2")
        finally:
            del os.environ["DANLU_API_KEY"]
    try:
        record = {"x0": 0.1, "x1": -0.2, "color": "green"}
        url = f"{server.url}/v1/predict"
        assert httpx.post(url, json={"records": [record]}, timeout=10).status_code == 401
        assert (
            httpx.post(url, json={"records": [record]}, headers={"X-API-Key": key}, timeout=10).status_code
            == 200
        )
        (_, supervisor_cmdline), *children = _environments(server.process.pid)
        assert len(children) >= 2  # the workers (and multiprocessing's helper)
        assert key not in supervisor_cmdline  # the supervisor's own environment is the one it was given
        for environ, cmdline in children:
            assert key.encode() not in environ and key not in cmdline
    finally:
        server.stop()


def test_a_key_on_the_command_line_works_with_a_warning(run):
    server = Server(run.path, "--api-key", "visible")
    try:
        response = httpx.post(
            f"{server.url}/v1/predict",
            json={"records": [{"x0": 0.1, "x1": -0.2, "color": "green"}]},
            headers={"Authorization": "Bearer visible"},
            timeout=10,
        )
        assert response.status_code == 200
    finally:
        server.stop()
    assert "--api-key is visible to every local user in `ps`" in server.process.stdout.read()


def test_a_warm_up_slower_than_the_timeout_is_one_line(tmp_path):
    slow = slow_run(tmp_path, seconds=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "danlu",
            "serve",
            str(slow.path),
            "--port",
            str(free_port()),
            "--timeout",
            "0.5",
            "--trust-model-code",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "longer than the request timeout (0.5 s)" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # it did not wait for the stuck prediction


def test_a_loopback_server_answers_only_its_own_names_and_json_bodies(run):
    """A keyless server on 127.0.0.1 is reachable from any web page the user opens: a page can POST
    text/plain to it without asking (no CORS preflight), and DNS rebinding lets a page read the answers
    under its own name. So JSON endpoints take JSON content types only (415), and a loopback-bound
    server answers only Host headers that name it (400); bound elsewhere, any name."""
    body = json.dumps({"records": [{"x0": 0.1, "x1": -0.2, "color": "green"}]})
    server = Server(run.path)
    try:
        url = f"{server.url}/v1/predict"
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost"):
            response = httpx.post(
                url, content=body, headers={"host": host, "content-type": "application/json"}
            )
            assert response.status_code == 200, (host, response.text)
        for path in ("/v1/predict", "/", "/v1/metadata"):
            rebound = httpx.request(
                "POST" if path == "/v1/predict" else "GET",
                f"{server.url}{path}",
                content=body if path == "/v1/predict" else None,
                headers={"host": f"attacker.example:{server.port}", "content-type": "application/json"},
            )
            assert rebound.status_code == 400 and "attacker.example" in rebound.json()["detail"], path
        simple = httpx.post(url, content=body, headers={"content-type": "text/plain"})
        assert simple.status_code == 415 and "application/json" in simple.json()["detail"]
    finally:
        server.stop()
    server = Server(run.path, "--host", "0.0.0.0")
    try:
        named = httpx.post(
            f"{server.url}/v1/predict",
            content=body,
            headers={"host": "danlu.internal.example", "content-type": "application/json"},
        )
        assert named.status_code == 200
    finally:
        server.stop()
