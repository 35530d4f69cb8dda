"""Shared fixtures: tiny data sets written to temp dirs, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def mixed_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Classification data with a categorical column, missing values and string labels."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=n)
    x1 = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    score = x0 + 0.5 * x1 + (color == "red") * 1.5
    label = np.where(score > 0.8, "high", np.where(score < -0.5, "low", "mid"))
    x1_missing = x1.copy()
    x1_missing[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({"x0": x0, "x1": x1_missing, "color": color, "label": label})


def regression_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = 100 + 20 * x[:, 0] - 10 * x[:, 1] + rng.normal(scale=2, size=n)
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "price": y})


@pytest.fixture
def mixed_csv(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.csv"
    mixed_frame().to_csv(path, index=False)
    return path


@pytest.fixture
def regression_csv(tmp_path: Path) -> Path:
    path = tmp_path / "house.csv"
    regression_frame().to_csv(path, index=False)
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m danlu ARGS` as a user would, capturing output (and typing `stdin`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "danlu", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_and_kill(config: Path, out: Path, epochs: int, danlu: tuple[str, ...] = ("-m", "danlu")) -> None:
    """`danlu train CONFIG --out OUT` as a real process, killed with SIGKILL once `epochs` epochs are
    logged: no clean-up code runs. Asserts it was killed mid-run and left a resumable, incomplete run.
    danlu: how python starts the CLI (`-c CODE` for one with a family registered first)."""
    import time

    process = subprocess.Popen(
        [sys.executable, *danlu, "-q", "train", str(config), "--out", str(out)],
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the tests' own modules (models, families)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            break
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert process.returncode == -9, "the run finished before it could be killed; make it longer"
    assert not (out / "report.json").exists()  # a killed run never looks complete
    assert (out / "checkpoints" / "last.pt").is_file()


def same_weights(a_run: Path, b_run: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(a_run / "model.safetensors"), load_file(b_run / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def priced_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Regression with a categorical column and missing numbers (for export parity)."""
    frame = regression_frame(n, seed)
    rng = np.random.default_rng(seed + 1)
    frame["zone"] = rng.choice(["north", "south", "east"], size=n)
    frame["price"] += np.where(frame["zone"] == "north", 15.0, 0.0)
    frame.loc[rng.random(n) < 0.1, "b"] = np.nan
    return frame


def train_quietly(out: Path, frame: pd.DataFrame, target: str, *overrides: str):
    """Train on a frame (written beside the run as CSV) with overrides; returns the Run."""
    import danlu

    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}.csv"
    frame.to_csv(data, index=False)
    args = [f"data.train={data}", f"data.target={target}", "model.hidden=[16]", *overrides]
    return danlu.train(None, args, out=out, progress=False, overwrite=True)
