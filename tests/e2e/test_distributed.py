"""Multi-process training on CPU/gloo with real torchrun processes (`danlu train --nproc N`, and
`danlu.train(nproc=N)`) and Ray Train workers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

import danlu
from tests.conftest import ROOT, mixed_frame, run_cli, write_config

CONFIG = """data: {{train: {data}, target: label}}
model: {{hidden: [32], dropout: {dropout}}}
train: {{epochs: {epochs}, batch_size: 64, schedule: cosine, patience: 0}}
"""


def weights(run_dir) -> torch.Tensor:
    return torch.cat([t.flatten() for t in load_file(run_dir / "model.safetensors").values()])


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    mixed_frame(2000).to_csv(folder / "data.csv", index=False)

    def make(epochs=4, dropout=0.0):
        text = CONFIG.format(data=folder / "data.csv", epochs=epochs, dropout=dropout)
        return write_config(folder / f"cfg_{epochs}_{dropout}.yaml", text)

    return make


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    """Weights of an uninterrupted run, trained once per module for each (epochs, dropout, processes)."""
    done = {}

    def weights_of(epochs=4, dropout=0.0, nproc=1):
        key = (epochs, dropout, nproc)
        if key not in done:
            out = tmp_path_factory.mktemp("uninterrupted")
            cfg = config(epochs, dropout)
            run = out / "run"
            done[key] = weights(train(cfg, run, "--nproc", str(nproc)) if nproc > 1 else train_here(cfg, run))
        return done[key]

    return weights_of


def train(config, out, *args):
    overrides = [a for a in args if "=" in a]  # overrides go right after the config
    flags = [a for a in args if "=" not in a]
    result = run_cli("-q", "train", str(config), *overrides, "--out", str(out), *flags, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def train_here(config, out, *overrides):
    """A single-process run in this process (no torch import to wait for): the same code as the CLI's."""
    return danlu.train(config, overrides, out=out, progress=False).path


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process(config, uninterrupted, tmp_path):
    cfg = config()
    one = uninterrupted()
    ran = run_cli(
        "train", str(cfg), "--out", str(tmp_path / "two"), "--nproc", "2", "--log-to", "tensorboard"
    )
    # torchrun saw two clean exits: no rank aborted tearing down its process group (see the next test)
    assert ran.returncode == 0, ran.stderr
    assert "terminate called" not in ran.stderr and "FAILED" not in ran.stderr, ran.stderr
    two = weights(tmp_path / "two")
    accumulated = weights(train_here(cfg, tmp_path / "acc", "train.accumulate=4"))
    # danlu.train(nproc=2) starts the same torchrun processes, here from a mapping (written to a file)
    mapping = yaml.safe_load(cfg.read_text())
    run = danlu.train(mapping, ["train.accumulate=2"], out=tmp_path / "both", nproc=2, progress=False)
    both = weights(run.path)
    for other in (two, accumulated, both):
        assert torch.allclose(one, other, rtol=1e-5, atol=1e-7)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2 and report["batch_size"] == 64
    assert not any(k.startswith("module.") for k in load_file(tmp_path / "two" / "model.safetensors"))
    epochs = [
        json.loads(line)["epoch"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3, 4]  # rank 0 alone writes the log
    # and alone tracks (and tracking leaves the weights as they were): one event file, every step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    steps = [
        e.step for e in EventAccumulator(str(tmp_path / "two" / "tensorboard")).Reload().Scalars("step/loss")
    ]
    steps_per_epoch = -(-report["rows"]["train"] // report["batch_size"])
    assert steps == list(range(1, 4 * steps_per_epoch + 1))


@pytest.mark.slow
def test_processes_that_fail_from_python_are_one_error_leaving_no_run_and_no_config_file(
    tmp_path, monkeypatch
):
    """A constant target passes the checks made before launch and fails in every rank as it loads the
    data: danlu.train(nproc=2) raises one DanluError naming torchrun's exit code, the run never looks
    complete, and the temporary config file the processes read is gone."""
    import tempfile

    rng = np.random.default_rng(0)
    data = tmp_path / "constant.csv"
    pd.DataFrame({"a": rng.normal(size=64), "y": 2.5}).to_csv(data, index=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    config = {"data": {"train": str(data), "target": "y"}, "train": {"epochs": 1, "batch_size": 32}}
    with pytest.raises(danlu.DanluError, match=r"the training processes failed \(torchrun exited 1\)"):
        danlu.train(config, out=tmp_path / "run", nproc=2, progress=False)
    assert not (tmp_path / "run" / "report.json").exists()
    assert list(scratch.iterdir()) == []


# a rank's own view after danlu.train returns: the OS threads gloo started for its process group
GLOO_THREADS = """
import os, sys, danlu
danlu.train(sys.argv[1], out=sys.argv[2], progress=False)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("rank", os.environ["RANK"], "gloo threads", sorted(n for n in names if "gloo" in n), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from Linux's /proc")
def test_a_finished_two_process_run_ends_its_group_and_exits_0(config, tmp_path):
    """Each rank's process group, with its gloo threads, ends before danlu.train returns (torch keeps the
    group alive when DDP first imports torch._dynamo after the group exists), so nothing of it is left
    to be torn down during interpreter exit, where a rank could abort and torchrun report the finished
    run FAILED. (test_two_processes_and_accumulation_match_one_process checks what torchrun says of a
    finished `danlu train --nproc 2`; every --nproc run checks its exit.)"""
    cfg = config(epochs=2)
    script = tmp_path / "train_and_list_threads.py"
    script.write_text(GLOO_THREADS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    listed = subprocess.run(
        [*torchrun, str(script), str(cfg), str(tmp_path / "listed")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sorted(line for line in listed.stdout.splitlines() if "gloo threads" in line) == [
        "rank 0 gloo threads []",
        "rank 1 gloo threads []",
    ], listed.stdout
    assert (tmp_path / "listed" / "report.json").is_file()


def _wait_for_epochs(run_dir, n, process, seconds=240):
    deadline = time.monotonic() + seconds
    path = run_dir / "metrics.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run ended or stalled before it could be interrupted")


def _launch(cfg, out, log, *args):
    """torchrun in the background; its output goes to a file (a pipe nobody reads could fill and block it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "danlu", "-q", "train", str(cfg), "--out", str(out), "--nproc", "2"]
    return subprocess.Popen([*command, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_identically_with_torchrun_or_ray(config, uninterrupted, tmp_path):
    cfg = config(epochs=20, dropout=0.3)  # dropout: every rank's RNG must be restored too
    full = uninterrupted(epochs=20, dropout=0.3, nproc=2)
    process = _launch(cfg, tmp_path / "killed", (tmp_path / "killed.log").open("w"))
    _wait_for_epochs(tmp_path / "killed", 3, process)
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    process.kill()
    process.wait()
    assert not (tmp_path / "killed" / "report.json").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_for_ray")
    result = run_cli("-q", "train", "--resume", str(tmp_path / "killed"), "--nproc", "2", timeout=600)
    assert result.returncode == 0, result.stderr
    assert torch.equal(full, weights(tmp_path / "killed"))
    # the same stopped run, resumed on Ray Train workers instead (danlu.train's backend="ray", as
    # --backend ray), ends with the same weights too
    import ray

    storage = str(tmp_path / "ray_results")
    try:
        run = danlu.train(resume=tmp_path / "killed_for_ray", backend="ray", ray_storage=storage)
    finally:
        ray.shutdown()  # the local Ray danlu started in this process
    assert torch.equal(full, weights(run.path))


@pytest.mark.slow
def test_torchrun_restarts_after_a_killed_rank_and_finishes_the_same(config, uninterrupted, tmp_path):
    cfg = config(epochs=20, dropout=0.3)
    full = uninterrupted(epochs=20, dropout=0.3, nproc=2)
    log = tmp_path / "restarted.log"
    process = _launch(cfg, tmp_path / "restarted", log.open("w"), "--max-restarts", "1")
    _wait_for_epochs(tmp_path / "restarted", 3, process)
    ranks = [
        p for p in psutil.Process(process.pid).children(recursive=True) if "danlu" in " ".join(p.cmdline())
    ]
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert torch.allclose(full, weights(tmp_path / "restarted"), rtol=1e-5, atol=1e-7)
    epochs = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "restarted" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == list(range(1, 21))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(cfg, out, rank, port, *overrides):
    """One rank started by hand, as a launcher would, with torchrun's environment variables."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    command = [sys.executable, "-m", "danlu", "-q", "train", str(cfg), *overrides, "--out", str(out)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def test_ranks_with_different_configs_fail_fast_with_a_clear_error(config, tmp_path):
    cfg, port = config(), free_port()
    processes = [
        _rank(cfg, tmp_path / "mismatch", rank, port, f"train.epochs={epochs}", "train.dist_timeout=60")
        for rank, epochs in ((0, 4), (1, 5))
    ]
    outputs = [p.communicate(timeout=120)[1] for p in processes]
    assert all(p.returncode == 2 for p in processes)
    assert all("different configs" in out and "Traceback" not in out for out in outputs)


def test_a_taken_port_and_an_absent_rank_zero_are_one_line_errors(config, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rank0 = _rank(config(), tmp_path / "a", 0, taken.getsockname()[1], "train.dist_timeout=5")
        error = rank0.communicate(timeout=120)[1]
    assert rank0.returncode == 2 and "the port is already in use" in error, error
    started = time.monotonic()
    rank1 = _rank(config(), tmp_path / "b", 1, free_port(), "train.dist_timeout=5")  # rank 0 never comes
    error = rank1.communicate(timeout=120)[1]
    assert rank1.returncode == 2 and "could not reach the rendezvous" in error, error
    assert error.strip().count("\n") == 0 and time.monotonic() - started < 60


def test_bad_multi_process_settings_are_one_line_before_any_process_starts(config):
    for args, message in (
        (("train.batch_size=63",), "does not divide"),
        (("train.device=cuda",), "needs 2 GPUs"),
    ):
        result = run_cli("train", str(config()), *args, "--nproc", "2")
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0
    result = run_cli("train", str(config()), "--backend", "ray", "--nproc", "2")
    assert result.returncode == 2 and "with --backend ray use --workers N" in result.stderr
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("train", str(config()), "--backend", "ray", "--ray-address", address)
    assert result.returncode == 2 and f"cannot reach the Ray head at {address}" in result.stderr
    assert result.stderr.strip().count("\n") == 0
