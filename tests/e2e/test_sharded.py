"""Sharded training over gloo with real torchrun processes (train.strategy=fsdp, PyTorch's FSDP2, and
deepspeed, ZeRO stages 1-3): the weights of one process for a table; sharded checkpoints that resume in
another number of processes; two "machines" on 127.0.0.1; Ray Train workers, tracked; the refusals.
The other families and ZeRO's checkpoint fragments: test_sharded_families.py.

The runs train with plain SGD: its step is proportional to the gradient, so a gradient summed over the
ranks instead of averaged (pytorch#162338's failure) moves the weights by about the whole update and
fails the comparisons (Adam would hide it: its step barely depends on the gradient's scale)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import danlu
from tests.conftest import ROOT, mixed_frame, run_cli, train_and_kill, write_config
from tests.e2e.test_distributed import free_port

SGD = "optimizer: sgd, lr: 0.05, precision: fp32"
TABLE = f"""data: {{train: {{data}}, target: label}}
model: {{hidden: [32, 32], dropout: 0.0}}
train: {{epochs: {{epochs}}, batch_size: 64, patience: 0, grad_clip: {{clip}}, {SGD}, strategy: {{strategy}}}}
"""


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train(config, out, *args) -> None:
    result = run_cli("-q", "train", str(config), "--out", str(out), *args, cwd=config.parent, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    mixed_frame(2000).to_csv(folder / "data.csv", index=False)

    def config(epochs: int, clip: float | None = 1.0, strategy: str = "fsdp"):
        text = TABLE.replace("{epochs}", str(epochs)).replace("{data}", str(folder / "data.csv"))
        text = text.replace("{clip}", str(clip or "null")).replace("{strategy}", strategy)
        return write_config(folder / f"table{epochs}_{clip}_{strategy}.yaml", text)

    return config


@pytest.fixture(scope="module")
def one_process(table, tmp_path_factory):
    """The 4-epoch table's weights trained in one process (this process)."""
    out = tmp_path_factory.mktemp("one") / "run"
    return weights(danlu.train(table(4), ["train.strategy=ddp"], out=out, progress=False).path)


@pytest.mark.slow
def test_two_processes_and_two_machines_reach_one_process_weights_of_a_table(table, one_process, tmp_path):
    config = table(4)
    one = one_process
    doubled = weights(danlu.train(config, ["train.lr=0.1"], out=tmp_path / "doubled", progress=False).path)
    assert largest_difference(one, doubled) > 1e-2  # a doubled gradient would be seen: 1000x the tolerance
    train(config, tmp_path / "two", "--nproc", "2", "train.accumulate=2")  # micro-batches without a sync
    assert largest_difference(one, weights(tmp_path / "two")) < 1e-5
    port = free_port()
    command = [sys.executable, "-m", "danlu", "-q", "train", str(config), "--out", str(tmp_path / "nodes")]
    command += ["--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    machines = [
        subprocess.Popen([*command, "--node-rank", str(rank)], env=env, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for machine in machines:
        assert machine.wait(timeout=600) == 0, machine.stderr.read()
    assert largest_difference(one, weights(tmp_path / "nodes")) < 1e-5
    report = danlu.Run(tmp_path / "nodes").report
    assert report["processes"] == 2
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert shards == ["best.pt", "last.pt", "shards-000004"]  # best and last are one epoch: one copy
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "shards-000004").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]


@pytest.mark.slow
def test_zero_stages_reach_one_process_weights_of_a_table_under_torchrun_and_ray(
    table, one_process, tmp_path, monkeypatch
):
    config = table(4, strategy="deepspeed")
    # DeepSpeed's CPU backend would compile its shared-memory kernel (45 s) here: danlu's ranks skip it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    # ZeRO-1 under torchrun (ZeRO-3 under torchrun: test_a_sharded_run_resumes_on_another_number_of_processes)
    train(config, tmp_path / "zero1", "--nproc", "2", "train.zero_stage=1", "train.accumulate=2")
    assert largest_difference(one_process, weights(tmp_path / "zero1")) < 1e-5
    # ZeRO-2 on Ray Train's workers: Ray places the processes and starts their group, the strategy runs
    # inside (FSDP and DDP take the same group: test_distributed resumes a DDP run on Ray)
    run, storage = tmp_path / "ray", tmp_path / "ray_results"
    ray = ("--backend", "ray", "--workers", "2", "--ray-storage", str(storage), "--log-to", "tensorboard")
    ran = run_cli("-q", "train", str(config), "train.zero_stage=2", "--out", str(run), *ray, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert largest_difference(one_process, weights(run)) < 1e-5
    assert danlu.Run(run).report["processes"] == 2
    files = sorted(p.name for p in (run / "checkpoints" / "shards-000004").iterdir())
    assert files == ["zero-00000-of-00002.safetensors", "zero-00001-of-00002.safetensors"]
    # only rank 0's worker tracks: one event file, each epoch's validation loss once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(EventAccumulator(str(run / "tensorboard")).Reload().Scalars("val_loss")) == 4
    assert "last epoch reported 4" in ran.stdout  # every epoch went through ray.train.report
    checkpoint = ran.stdout.split("checkpoint ")[-1].strip()
    assert checkpoint.startswith(str(storage)) and (Path(checkpoint) / "last.pt").is_file()
    assert not (tmp_path / "torch_extensions").exists()  # nothing compiled
    assert "untested optimizer" not in ran.stdout + ran.stderr  # DeepSpeed's note on danlu's own choice


@pytest.mark.slow
def test_a_sharded_run_resumes_on_another_number_of_processes(table, tmp_path):
    config = table(16, clip=None)  # over many steps clipping's kink turns rounding into 1e-3
    full = weights(danlu.train(config, out=tmp_path / "full", progress=False).path)
    # stopped in two processes, finished in one
    train_and_kill(config, tmp_path / "two", 5, ("-m", "danlu"), "--nproc", "2")
    assert len(list((tmp_path / "two" / "checkpoints").glob("shards-*/__1_0.distcp"))) >= 1
    resumed = run_cli("-q", "train", "--resume", str(tmp_path / "two"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert largest_difference(full, weights(tmp_path / "two")) < 1e-5
    # stopped in one process, finished in two
    train_and_kill(config, tmp_path / "one", 5)
    resumed = run_cli("-q", "train", "--resume", str(tmp_path / "one"), "--nproc", "2", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert largest_difference(full, weights(tmp_path / "one")) < 1e-5
    epochs = [r["epoch"] for r in danlu.Run(tmp_path / "one").metrics]
    assert epochs == list(range(1, 17))
    # ZeRO-3 (each parameter partitioned) stopped in two processes, finished in four: every rank reads
    # its new partition of the weights and of SGD's momentum from the fragments the two wrote (8 epochs:
    # ZeRO-3's collectives per parameter make an epoch in four processes on two cores take seconds)
    zero = table(8, clip=None, strategy="deepspeed")
    full8 = weights(danlu.train(zero, ["train.strategy=ddp"], out=tmp_path / "full8", progress=False).path)
    train_and_kill(zero, tmp_path / "zero", 3, ("-m", "danlu"), "--nproc", "2", "train.zero_stage=3")
    alone = run_cli("-q", "train", "--resume", str(tmp_path / "zero"), timeout=600)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "train.strategy=deepspeed trains in several processes" in alone.stderr
    resumed = run_cli("-q", "train", "--resume", str(tmp_path / "zero"), "--nproc", "4", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert largest_difference(full8, weights(tmp_path / "zero")) < 1e-5
    assert danlu.Run(tmp_path / "zero").report["processes"] == 4


def test_sharding_refusals_are_one_line(table, tmp_path):
    config = table(2)
    one = run_cli("train", str(config), "--out", str(tmp_path / "one"), "--nproc", "1", cwd=config.parent)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert "train.strategy=fsdp shards the model over several processes" in one.stderr
    nodes = run_cli("train", str(config), "--nproc", "1", "--nnodes", "2", cwd=config.parent)
    assert nodes.returncode == 2 and "--nnodes 2 needs --master-addr" in nodes.stderr
    stage = run_cli("train", str(config), "train.strategy=deepspeed", "train.zero_stage=4", "--nproc", "2")
    assert (
        stage.returncode == 2 and "train.zero_stage: Input should be less than or equal to 3" in stage.stderr
    )
    alone = run_cli("train", str(config), "train.strategy=deepspeed", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 2 and "train.strategy=deepspeed trains in several processes" in alone.stderr
    assert not (tmp_path / "alone").exists()
    # a stopped sharded run whose config.yaml was changed to another strategy
    run = tmp_path / "changed"
    danlu.train(config, ["train.epochs=2"], out=run, progress=False)
    (run / "report.json").unlink()
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("fsdp", "ddp"))
    changed = run_cli("train", "--resume", str(run))
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "checkpoint was written by train.strategy=fsdp but its config.yaml says" in changed.stderr
