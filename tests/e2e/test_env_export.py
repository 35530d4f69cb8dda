"""`danlu env export` recreates a working environment: a fresh venv installed from its requirements
(`pip install -r`) then serves the build context that `danlu package` wrote, from danlu's copied source."""

import os
import subprocess
import sys
import venv

import httpx
import pytest

from tests.conftest import mixed_frame, run_cli, train_quietly
from tests.e2e.test_serve_process import Server


def test_env_export_formats_pin_torch_and_danlus_dependencies_from_the_cli_and_python():
    import danlu

    for fmt in ("requirements", "conda", "lock"):
        result = run_cli("env", "export", "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert "torch==2." in result.stdout and "fastapi==" in result.stdout
        assert danlu.export_environment(fmt) == result.stdout  # the Python API's text is the CLI's
    with pytest.raises(danlu.DanluError, match="unknown environment format 'pip'"):
        danlu.export_environment("pip")
    lock = run_cli("env", "export", "--format", "lock").stdout
    assert "pydantic-core==" in lock and "uvicorn[standard]==" in lock  # transitive, with extras


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`danlu env export | head -1`: the pipe closes before danlu writes; it stops without a traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before danlu starts
    done = subprocess.run(
        [sys.executable, "-m", "danlu", "env", "export", "--format", "lock"],
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(writer)
    assert done.returncode == 141 and done.stderr == ""


@pytest.mark.slow
def test_a_fresh_venv_from_env_export_serves_the_packaged_run(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(run_cli("env", "export").stdout)
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {**os.environ, "PIP_RETRIES": "0"}  # an unreachable extra index must not stall the install
    install = subprocess.run(
        # --no-compile: byte-compiling torch would double the time and proves nothing here
        [python, "-m", "pip", "install", "--quiet", "--no-compile", "-r", str(requirements)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    run = train_quietly(tmp_path / "cls", mixed_frame(200), "label", "train.epochs=2")
    packaged = run_cli("package", str(run.path), "--out", str(tmp_path / "context"))
    assert packaged.returncode == 0
    assert (
        "left out of run/ (not needed to serve): " in packaged.stdout and "heldout.parquet" in packaged.stdout
    )
    # as the image would: danlu from the build context, the fresh venv's packages, the copied run
    server = Server(tmp_path / "context" / "run", python=python, pythonpath=tmp_path / "context")
    try:
        record = {"x0": 0.2, "x1": None, "color": "blue"}
        response = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
