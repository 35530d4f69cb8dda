"""What the train.strategy values are, without importing torch (the CLI checks a launch before torch is
imported): which shard the model, and what each needs installed. How they wrap a model is
danlu.training.sharding."""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

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


def check_processes(strategy: str, processes: int) -> None:
    """DeepSpeed's ZeRO shards over several processes and has no one-process mode."""
    if strategy == "deepspeed" and processes == 1:
        raise DanluError(
            "train.strategy=deepspeed trains in several processes; this is one",
            "start it with --nproc 2 or more, or use train.strategy=fsdp (it also trains in one process)",
        )


def import_deepspeed() -> Any:
    """DeepSpeed (None when it is not installed), imported without the MLflow import its autotuner makes
    when MLflow is installed: MLflow takes 1-2 s (more than DeepSpeed itself) of every start that imports
    DeepSpeed, for a tool danlu never runs. Those are each ZeRO rank's, and each causal LM run's end
    (transformers' save_pretrained imports DeepSpeed when installed). An MLflow already imported (a run
    tracked there) is left in place; one imported later loads as usual. DeepSpeed's guess of the
    accelerator at import, a warning on stdout, shows only with --debug."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    if importlib.util.find_spec("deepspeed") is None:
        return None
    held = "mlflow" not in sys.modules
    if held:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    logger = logging.getLogger("DeepSpeed")  # DeepSpeed sets its level and handler; a filter stays

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or logging.getLogger("danlu").isEnabledFor(logging.DEBUG)

    logger.addFilter(errors_only)
    try:
        import deepspeed
    finally:
        logger.removeFilter(errors_only)
        if held and sys.modules.get("mlflow", ...) is None:
            del sys.modules["mlflow"]
    return deepspeed
