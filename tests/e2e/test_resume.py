"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

import json

import pytest

import danlu
from tests.conftest import run_cli, same_weights, train_and_kill, write_config

CONFIG = """data:
  train: synthetic:classification
  synthetic: {n_samples: 30000}
model: {hidden: [64, 64], dropout: 0.2}
train: {epochs: 14, batch_size: 128, patience: 0}
"""


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", CONFIG)
    full = danlu.train(config, out=tmp_path / "full", progress=False).path  # in this process: no startup

    killed = tmp_path / "killed"
    train_and_kill(config, killed, epochs=5)
    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert same_weights(full, killed), "resumed weights differ from the uninterrupted run"
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 15))  # each epoch logged once despite the replay

    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 2 and "already complete" in result.stderr
