"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import danlu
from tests.conftest import run_cli, write_config

CONFIG = """data:
  train: synthetic:classification
  synthetic: {n_samples: 30000}
model: {hidden: [64, 64], dropout: 0.2}
train: {epochs: 14, batch_size: 128, patience: 0}
"""


def _epochs_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", CONFIG)
    full = danlu.train(config, out=tmp_path / "full", progress=False).path  # in this process: no startup

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "danlu", "-q", "train", str(config), "--out", str(killed)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while _epochs_logged(killed) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()  # SIGKILL: no clean-up code runs
    process.wait()
    assert process.returncode == -9, "the run finished before it could be killed; make it longer"
    assert not (killed / "report.json").exists()  # a killed run never looks complete
    assert (killed / "checkpoints" / "last.pt").is_file()

    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 15))  # each epoch logged once despite the replay

    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 2 and "already complete" in result.stderr
