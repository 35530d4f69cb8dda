"""Shared fixtures: tiny data sets written to temp dirs, the real CLI in a subprocess, and a guard that fails
a test on any network access."""

from __future__ import annotations

import ipaddress
import os
import socket
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


def train_and_kill(
    config: Path, out: Path, epochs: int, danlu: tuple[str, ...] = ("-m", "danlu"), *flags: str
) -> None:
    """`danlu train CONFIG --out OUT FLAGS` as a real process, killed with SIGKILL (with every process it
    started, torchrun's ranks) once `epochs` epochs are logged: no clean-up code runs. Asserts it was
    killed mid-run and left a resumable, incomplete run. danlu: how python starts the CLI (`-c CODE` for
    one with a family registered first)."""
    import time

    import psutil

    process = subprocess.Popen(
        [sys.executable, *danlu, "-q", "train", str(config), "--out", str(out), *flags],
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
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    process.kill()
    process.wait()
    assert process.returncode == -9, "the run finished before it could be killed; make it longer"
    assert not (out / "report.json").exists()  # a killed run never looks complete
    assert (out / "checkpoints" / "last.pt").is_file()


def interrupted_at_epoch(monkeypatch, epoch: int, train) -> None:
    """train() with training interrupted (KeyboardInterrupt, as Ctrl-C) as epoch `epoch` starts."""
    from danlu.training import trainer

    original = trainer.train_epoch

    def stop(s, tc, current, *rest):
        if current == epoch:
            raise KeyboardInterrupt
        return original(s, tc, current, *rest)

    monkeypatch.setattr(trainer, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(trainer, "train_epoch", original)


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


# what tells Hugging Face libraries to stay offline: unset under no_network, so the guard is what is tested
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "USE_HUB_KERNELS")


def train_in_a_fresh_interpreter(tmp_path: Path, before: str, after: str) -> str:
    """A small two-class table trained by danlu.train (`run`) in a new Python, with the code `before` run
    first and `after` run last; the last line `after` prints."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    pd.DataFrame({"x": x, "label": np.where(x > 0, "up", "down")}).to_csv(tmp_path / "t.csv", index=False)
    code = (
        f"{before}\nimport sys, danlu\n"
        f"args = ['data.train={tmp_path / 't.csv'}', 'data.target=label', 'train.epochs=1']\n"
        f"run = danlu.train(None, args, out={str(tmp_path / 'run')!r}, progress=False)\n{after}\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip().splitlines()[-1]


def _loopback(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost: resolving it is network access


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything it runs in this process looks up a host or connects outside loopback,
    even when the caller catches the error and goes on (a library falling back quietly): every attempt
    is recorded and the test fails at its end if there was one."""
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    attempts: list[str] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def allowed(sock, address) -> bool:
        return sock.family == getattr(socket, "AF_UNIX", None) or _loopback(address[0])

    def guarded_connect(sock, address):
        if not allowed(sock, address):
            attempts.append(f"connect {address}")
            raise OSError(f"network access in a test: connect to {address}")
        return connect(sock, address)

    def guarded_connect_ex(sock, address):
        if not allowed(sock, address):
            attempts.append(f"connect {address}")
            return 111  # ECONNREFUSED
        return connect_ex(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _loopback(host.decode() if isinstance(host, bytes) else host):
            attempts.append(f"lookup {host}")
            raise socket.gaierror(f"network access in a test: lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert attempts == [], f"network access: {attempts}"
