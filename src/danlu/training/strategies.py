"""What the train.strategy values are, without importing torch (the CLI checks a launch before torch is
imported): which shard the model, and what each needs installed. How they wrap a model is
danlu.training.sharding."""

from __future__ import annotations

import importlib.util

from danlu.errors import DanluError

SHARDED = ("fsdp", "deepspeed")
INSTALL_DEEPSPEED = "pip install 'danlu[deepspeed]'"


def shards(strategy: str) -> bool:
    """Whether a run of this strategy shards the model and keeps sharded checkpoints (fsdp: in every
    process count, so that a run can go on in another: 2 -> 1, 1 -> 2)."""
    return strategy in SHARDED


def check_installed(strategy: str) -> None:
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        missing = "train.strategy=deepspeed needs DeepSpeed, which is not installed"
        raise DanluError(missing, INSTALL_DEEPSPEED)
