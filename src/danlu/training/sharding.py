"""How several processes hold the model (train.strategy): DDP, where every rank holds all of it, or FSDP2
(`torch.distributed.fsdp.fully_shard`), where each rank holds 1/N of the parameters, gradients and
optimizer state, and gathers one block's parameters at a time for its forward and backward.

Sharded runs checkpoint with `torch.distributed.checkpoint` (danlu.training.checkpoint) and end with one
consolidated model (`consolidated_model`), so evaluate, export and serve see the same run either way."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from danlu.errors import DanluError
from danlu.training.distributed import World

log = logging.getLogger("danlu")

SHARDED_STRATEGIES = ("fsdp",)


def shards(strategy: str) -> bool:
    """Whether a run of this strategy keeps sharded checkpoints (in every process count, so that a run
    can go on in another: 2 -> 1, 1 -> 2)."""
    return strategy in SHARDED_STRATEGIES


def check(strategy: str, world: World, uneven: bool, precision: str) -> None:
    """What a strategy cannot do, as one line before training starts."""
    if not (shards(strategy) and world.multi):
        return
    if uneven:
        raise DanluError(
            f"train.strategy={strategy} needs every process to take the same steps, but this table is "
            "streamed in chunks (it is over data.memory_budget)",
            "raise data.memory_budget so the table is held in memory, or use train.strategy=ddp",
        )
    if precision == "fp16":
        raise DanluError(
            f"train.precision=fp16 is not supported with train.strategy={strategy}",
            "use train.precision=bf16 (or fp32)",
        )


def wrap(
    model: nn.Module,
    strategy: str,
    blocks: list[nn.Module],
    world: World,
    device: torch.device,
    precision: str,
) -> nn.Module:
    """The model as this strategy trains it in this world. One process trains the bare model."""
    if not world.multi:
        return model
    if not shards(strategy):
        # every rank starts from rank 0's weights; gradients are averaged in backward
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16: blocks gather and compute in bf16, gradients are reduced and kept in fp32 beside fp32
    # master weights (the optimizer's); fp32: everything in fp32
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # what no block holds: embeddings, heads, a small model whole
    log.debug("fsdp: %d blocks sharded over %d processes", len(blocks), world.size)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> Any:
    """A context in which backward reduces the gradients over the processes (sync) or only accumulates
    them locally (the micro-batches before an optimizer step's last)."""
    if sync:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return model.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state on rank 0's CPU (empty on the other ranks), gathered one
    parameter at a time: no device ever holds more than the shard and one gathered parameter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
