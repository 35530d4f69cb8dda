"""`danlu train --backend ray`: the same trainer in each worker of Ray Train's TorchTrainer. Ray starts the
workers and their process group and sets RANK / WORLD_SIZE / LOCAL_RANK; `danlu.train` runs unchanged in
each, rank 0 writes the run directory, and every epoch is reported to Ray (rank 0's checkpoint with it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from danlu.errors import DanluError, one_line

# Ray Train's controller collects each worker's report at its health-check interval (2 s by default) and
# ray.train.report blocks until it has; danlu reports every epoch, so it asks for a shorter interval.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail in seconds on a head node that is not listening (ray.init would retry for minutes)."""
    if not address or address == "auto" or "://" in address:
        return  # a new local instance, the local one, or Ray Client with its own timeout
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise DanluError(
            f"cannot reach the Ray head at {address} ({error})",
            "start it with `ray start --head` or pass its host:port as --ray-address",
        ) from None


def init_ray(address: str | None) -> None:
    """Connect to the Ray cluster at `address` (None: start a local one), unless already connected."""
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {POLL_ENV: os.environ.get(POLL_ENV, "0.1")}},
        )
    except Exception as error:  # ConnectionError, an auth error, a version mismatch...
        where = address or "a new local instance"
        raise DanluError(
            f"cannot start or reach Ray at {where}: {one_line(error, last=True)}",
            "check --ray-address (the head's host:port, or ray://host:10001) and `ray status` there",
        ) from error


def _report_epoch(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
    import ray.train

    checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
    ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import danlu.api

    danlu.api.train(
        loop_config["config"],
        out=loop_config["out"],
        resume=loop_config["resume"],
        overwrite=loop_config["overwrite"],
        progress=False,
        on_epoch=_report_epoch,
    )


def train_with_ray(
    config: Any, out: str | Path | None, resume: str | Path | None, overwrite: bool, workers: int,
    address: str | None, use_gpu: bool, storage: str | None = None,
):  # fmt: skip
    """Run danlu's trainer on `workers` Ray Train workers; returns the finished Run and Ray's Result.

    storage: where Ray keeps the reported checkpoints (Ray's default ~/ray_results; on a multi-node
    cluster a path every node can reach, e.g. NFS or s3://)."""
    try:
        import ray
        import ray.train
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise DanluError("the ray backend needs Ray Train", "pip install 'danlu[ray]'") from None
    from danlu.api import Run

    if resume is None and out is None:
        out = config.output
    init_ray(address)
    target = Path(resume or out).resolve()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            # unset keys stay unset, so each worker fills in the family's defaults as one process does
            "config": None if resume else config.model_dump(mode="json", exclude_unset=True),
            "out": None if resume else str(target),
            "resume": str(target) if resume else None,
            "overwrite": overwrite,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=storage, name=f"danlu-{target.name}"),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise _worker_error(error) from error
    return Run(target), result


def _worker_error(error: Exception) -> DanluError:
    """A worker's own DanluError as it is, anything else as one line (--debug shows the whole chain)."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = getattr(failures[rank], "cause", None) or failures[rank]  # unwrap a RayTaskError
        if isinstance(cause, DanluError):
            return cause
    first = next(iter(failures.values()), error)
    fix = "run with --debug for the workers' tracebacks"
    return DanluError(f"Ray Train failed: {one_line(first, last=True)}", fix)
