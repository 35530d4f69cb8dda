"""Training in several processes: torchrun's on this machine or several, or Ray Train's workers.

`danlu train --nproc N` / `--backend ray` and `danlu.train(nproc=N)` / `danlu.train(backend="ray")` both
come here. Everything every process would fail on is checked in this process first, as one line, before
any starts; torchrun's processes then run `danlu train` themselves, each the same command."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.errors import DanluError

if TYPE_CHECKING:
    from danlu.config import Config

BACKENDS = ("torchrun", "ray")


@dataclass(frozen=True)
class Launch:
    """How the processes start (the same names as `danlu train`'s flags)."""

    nproc: int | None = None  # torchrun: processes on this machine; None: train in this process
    max_restarts: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    backend: str = "torchrun"
    workers: int | None = None  # ray: Ray Train workers, wherever the cluster places them (None: 2)
    ray_address: str | None = None
    ray_storage: str | None = None

    @property
    def several(self) -> bool:
        """Whether this starts other processes (else the run trains in this one)."""
        return self.backend == "ray" or self.nproc is not None

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise DanluError(f"unknown backend '{self.backend}'", "use torchrun or ray")
        torchrun_only = self.nproc is not None or self.max_restarts or self.nnodes != 1
        if self.backend == "ray" and torchrun_only:
            raise DanluError(
                "--nproc, --nnodes and --max-restarts are torchrun's",
                "with --backend ray use --workers N (Ray places them on the cluster's machines)",
            )
        ray_only = self.workers is not None or self.ray_address is not None or self.ray_storage is not None
        if self.backend != "ray" and ray_only:
            raise DanluError("--workers, --ray-address and --ray-storage are Ray's", "add --backend ray")
        if self.backend == "torchrun" and self.nproc is None and torchrun_only:
            raise DanluError(
                "--nnodes and --max-restarts go with --nproc", "add --nproc N: the processes on each machine"
            )
        if self.nproc is not None and self.nproc < 1:
            raise DanluError("--nproc must be at least 1", "e.g. --nproc 2")
        if self.workers is not None and self.workers < 1:
            raise DanluError("--workers must be at least 1", "e.g. --workers 2")
        if self.several and "WORLD_SIZE" in os.environ:
            raise DanluError(
                "this process is already one of a run's processes (WORLD_SIZE is set)",
                "start the processes once: --nproc or --backend ray in the first command only",
            )


def checked_config(
    config: Config | dict | str | Path | None,
    overrides: Sequence[str],
    out: str | Path | None,
    resume: str | Path | None,
    overwrite: bool,
) -> Config:
    """The config the processes will train, read and checked here, once, before torch is imported: a
    stopped run's own, or the given one with its overrides; its data files exist and hold the columns it
    names, and its run directory is new (or overwrite)."""
    from danlu.config import as_config, check_data, read_yaml, validate
    from danlu.run import RunDir
    from danlu.tracking import check_installed

    if resume is not None:
        resume_alone(config, overrides, out)
        run = RunDir(resume)
        run.require_resumable()
        cfg = validate(read_yaml(run.config))
    else:
        cfg = as_config(config, overrides)
        if "WORLD_SIZE" not in os.environ:  # a launcher's ranks find the directory rank 0 is writing
            RunDir(out if out is not None else cfg.output).check_new(overwrite)
    check_data(cfg.data)  # moved since a stopped run started, or mistyped
    check_installed(cfg.train.log_to)
    return cfg


def resume_alone(config: Any, overrides: Sequence[str], out: Any) -> None:
    """A resumed run trains its own config.yaml into its own directory: nothing else may come with it."""
    if config is not None or list(overrides) or out is not None:
        raise DanluError("resume takes no config, overrides or output", "the run's own config.yaml is used")


def torchrun(
    launch: Launch,
    config: Config,
    source: str | Path | None,
    overrides: Sequence[str],
    out: str | Path | None,
    resume: str | Path | None,
    overwrite: bool,
    flags: Sequence[str] = (),
) -> int:
    """`torchrun --nproc-per-node N -m danlu FLAGS train SOURCE OVERRIDES ...`: torchrun's exit code.

    source: the config's YAML file, given with its overrides as they came; None (a config object) writes
    `config` to a temporary file for the processes to read."""
    check_before_launch(config, launch.nproc, launch.nnodes)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    command += _rendezvous(launch)
    command += [f"--max-restarts={launch.max_restarts}", "-m", "danlu", *flags, "train"]
    options = []
    for flag, value in (("--out", out), ("--resume", resume)):
        options += [flag, str(value)] if value is not None else []
    options += ["--overwrite"] if overwrite else []
    threads = str(max(1, (os.cpu_count() or 1) // launch.nproc))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    with _config_file(config, source, resume) as path:
        given = [str(path), *overrides] if path is not None else []
        return subprocess.run([*command, *given, *options], env=env).returncode


@contextmanager
def _config_file(config: Config, source: str | Path | None, resume: str | Path | None) -> Iterator[Any]:
    """The YAML file the processes train from: the given one, a temporary copy of a config object (its
    unset keys left out, so each process fills in the family's defaults as one process does), or None
    when they resume a run (its own config.yaml)."""
    if resume is not None or source is not None:
        yield source
        return
    import yaml

    raw = {**config.model_dump(mode="json", exclude_unset=True), "output": config.output}
    handle, name = tempfile.mkstemp(prefix="danlu-config-", suffix=".yaml")
    try:
        with os.fdopen(handle, "w") as file:
            yaml.safe_dump(raw, file, sort_keys=False)
        yield name
    finally:
        os.unlink(name)


def ray(launch: Launch, config: Config, out: str | Path | None, resume: str | Path | None, overwrite: bool):
    """The run on Ray Train workers: (the finished Run, Ray's Result)."""
    import torch

    from danlu.config import resolve_paths
    from danlu.training.ray_train import train_with_ray

    use_gpu = config.train.device != "cpu" and torch.cuda.is_available()
    new = None if resume is not None else resolve_paths(config, Path.cwd())
    workers = 2 if launch.workers is None else launch.workers
    return train_with_ray(
        new, out, resume, overwrite, workers, launch.ray_address, use_gpu, launch.ray_storage
    )


def _rendezvous(launch: Launch) -> list[str]:
    """How torchrun's processes find each other: on this machine alone, or on machine 0's address."""
    if launch.nnodes < 1:
        raise DanluError("--nnodes must be at least 1", "e.g. --nnodes 2")
    if launch.nnodes == 1:
        return ["--standalone"]
    if not 0 <= launch.node_rank < launch.nnodes:
        raise DanluError(
            f"--node-rank {launch.node_rank} is outside 0 to {launch.nnodes - 1}",
            "give each machine its own rank, 0 on the machine at --master-addr",
        )
    if not launch.master_addr:
        raise DanluError(
            f"--nnodes {launch.nnodes} needs --master-addr", "pass machine 0's address on every machine"
        )
    return [
        f"--nnodes={launch.nnodes}",
        f"--node-rank={launch.node_rank}",
        f"--master-addr={launch.master_addr}",
        f"--master-port={launch.master_port}",
    ]


def check_before_launch(config: Config, nproc: int, nnodes: int = 1) -> None:
    """Catch what every rank would fail on (an indivisible batch, CUDA without GPUs, a sharded strategy
    in one process) in this process, as one line, before starting any."""
    from danlu.config import check_batch_split
    from danlu.training.strategies import check_installed, shards

    tc = config.train
    check_installed(tc.strategy)
    if shards(tc.strategy) and nproc * nnodes == 1:
        raise DanluError(
            f"train.strategy={tc.strategy} shards the model over several processes; --nproc 1 starts one",
            "use --nproc 2 or more, or train without --nproc (one process: nothing to shard)",
        )
    check_batch_split(tc, nproc * nnodes)
    if config.train.device != "cuda":
        return  # torch is imported only to count GPUs: the ranks import it soon enough
    import torch

    if torch.cuda.device_count() < nproc:
        raise DanluError(
            f"train.device=cuda (nccl) needs {nproc} GPUs; this machine has {torch.cuda.device_count()}",
            "use --nproc up to the GPU count, or train.device=cpu (gloo)",
        )
