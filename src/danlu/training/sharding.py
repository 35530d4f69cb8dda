"""How several processes hold the model (train.strategy): DDP, where every rank holds all of it; FSDP2
(`torch.distributed.fsdp.fully_shard`), where each rank holds 1/N of the parameters, gradients and
optimizer state and gathers one block's parameters at a time for its forward and backward; or DeepSpeed's
ZeRO (stage 1: the optimizer state sharded, 2: and the gradients, 3: and the parameters) with danlu's own
torch optimizer and schedule.

Sharded runs checkpoint shard by shard (danlu.training.checkpoint) and end with one consolidated model
(`full_state`), so evaluate, export and serve see the same run either way."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from danlu.errors import DanluError
from danlu.training.distributed import World
from danlu.training.strategies import check_installed, check_processes, import_deepspeed, shards

log = logging.getLogger("danlu")

BUCKET_ELEMENTS = 25_000_000


def check(strategy: str, world: World, uneven: bool, precision: str) -> None:
    """What a strategy cannot do, as one line before training starts."""
    check_installed(strategy)
    check_processes(strategy, world.size)
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
    tc: Any,
    blocks: list[nn.Module],
    world: World,
    device: torch.device,
    precision: str,
    batch_size: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> tuple[nn.Module, Any]:
    """The model as this strategy trains it in this world, and its optimizer (made by make_optimizer
    over the parameters as the strategy holds them). One process trains the bare model."""
    if not world.multi:
        model.to(device)
        return model, make_optimizer(model)
    if shards(tc.strategy):
        _contiguous(model)
    if tc.strategy == "deepspeed":
        return _deepspeed(model, tc, world, device, precision, batch_size, make_optimizer(model))
    if tc.strategy == "fsdp":
        model = _fsdp(model, blocks, world, device, precision)
        return model, make_optimizer(model)
    # every rank starts from rank 0's weights; gradients are averaged in backward
    model.to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return ddp, make_optimizer(ddp)


def _contiguous(model: nn.Module) -> None:
    """FSDP and DeepSpeed flatten parameters, which must be contiguous: the image family's convolution
    weights are channels-last (its inputs stay so; the convolutions take either layout)."""
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()


def _fsdp(model: nn.Module, blocks: list[nn.Module], world: World, device: torch.device, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16: blocks gather and compute in bf16, gradients are reduced and kept in fp32 beside fp32
    # master weights (the optimizer's); fp32: everything in fp32
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    # what no block holds (embeddings, heads, a small model whole); its parameters stay gathered from
    # the forward into the backward, which begins with them
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    log.debug("fsdp: %d blocks sharded over %d processes", len(blocks), world.size)
    return model.to(device)  # each rank's shards alone reach its device


def _deepspeed(model, tc, world: World, device: torch.device, precision: str, batch_size: int, optimizer):
    """DeepSpeed's engine over the model and danlu's optimizer. The engine's step reduces, clips
    (train.grad_clip) and steps at each optimizer step's last micro-batch; danlu sets the learning
    rate on its parameter groups as for any optimizer."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # no probing for other accelerators
    # DeepSpeed's buckets default to 5e8 elements (2 GB in fp32, allocated whole by ZeRO-3): a 16th of
    # the model, at most 25M elements (100 MB in fp32; DDP's bucket is 25 MB)
    bucket = max(1, min(BUCKET_ELEMENTS, sum(p.numel() for p in model.parameters()) // 16))
    config = {
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": tc.accumulate,
        "train_micro_batch_size_per_gpu": batch_size // (world.size * tc.accumulate),
        "zero_optimization": {
            "stage": tc.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "gradient_clipping": tc.grad_clip or 0.0,
        "bf16": {"enabled": precision == "bf16"},
    }
    engine, zero_optimizer = start_deepspeed(model.to(device), optimizer, config)
    log.debug("deepspeed: ZeRO stage %d over %d processes", tc.zero_stage, world.size)
    return engine, zero_optimizer


def start_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """DeepSpeed's engine and ZeRO optimizer over a model on its device and a torch optimizer, in a
    torch.distributed process group already started, as every danlu rank starts one: DeepSpeed
    imported without MLflow, its logging quiet (--debug shows it), its backend started without the
    shared-memory kernel's C++ build, and ZeRO-3's fp32 masters sharing the parameters' memory.
    config is DeepSpeed's own; danlu adds that its torch optimizer is chosen on purpose and that the
    engine prints no step counts."""
    config = {"zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, **config}
    with _deepspeed_quiet():
        deepspeed = import_deepspeed()
        with _without_shared_memory_kernel():
            engine, zero_optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False
            )
    if config.get("zero_optimization", {}).get("stage") == 3:
        _share_fp32_masters(zero_optimizer)
    return engine, zero_optimizer


def _share_fp32_masters(zero: Any) -> None:
    """ZeRO-3 with fp32 parameters: the fp32 master partitions its optimizer steps become the
    parameters' own partitions, as DeepSpeed intends when they are fp32 already. Its check compares
    the partition's torch.device with a device name (a string), which is never equal, so it keeps a
    second fp32 copy of every partition: half the model per process at 2 processes. (In bf16 the
    masters are a copy by design.) The master keeps its identity, which the optimizer's state is
    keyed by; DeepSpeed's copy from master to partition after each step becomes a copy onto itself."""
    for partition, master in zip(
        zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True
    ):
        if (
            partition is not None
            and master is not partition
            and master.dtype == partition.dtype
            and master.device == partition.device
            and master.shape == partition.shape
        ):
            master.data = partition.data


@contextlib.contextmanager
def _without_shared_memory_kernel() -> Iterator[None]:
    """DeepSpeed's communication backend compiles a C++ extension, a shared-memory all-reduce for CPU
    processes, when it starts: about 45 s of a compiler on 2 cores at a machine's first ZeRO run, and a
    failed start where no compiler is installed. Only DeepSpeed's inference (tensor-parallel layers)
    calls that kernel; ZeRO's collectives go through torch.distributed. danlu's ranks start the backend
    without building it."""
    backend = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` names torch itself
    build = getattr(backend, "build_shm_op", None)
    if build is None:
        yield
        return
    backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        backend.build_shm_op = build


@contextlib.contextmanager
def _deepspeed_quiet() -> Iterator[None]:
    """DeepSpeed logs its configuration and every checkpoint at INFO: danlu's --debug shows them. Its
    collectives use two torch.distributed names torch has deprecated: that warning is DeepSpeed's to
    act on, not the user's; so is its warning that ZeRO runs an untested optimizer (danlu's own torch
    optimizers, by choice: zero_allow_untested_optimizer)."""
    logger = logging.getLogger("DeepSpeed")
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
        logger.addFilter(_not_untested_optimizer)  # added once however many runs a process starts
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    yield


def _not_untested_optimizer(record: logging.LogRecord) -> bool:
    return "untested optimizer" not in record.getMessage()


def is_deepspeed(model: Any) -> bool:
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def is_sharded(model: nn.Module) -> bool:
    """Each process holds a part of this model: every process takes part in its forward (validation),
    its checkpoints and its consolidation."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or is_deepspeed(model)


def gradient_sync(model: nn.Module, sync: bool) -> Any:
    """A context in which backward reduces the gradients over the processes (sync) or only accumulates
    them locally (the micro-batches before an optimizer step's last). DeepSpeed counts the
    micro-batches itself."""
    if sync or is_deepspeed(model):
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state on rank 0's CPU (empty on the other ranks), gathered one
    parameter at a time: no device ever holds more than the shard and one gathered parameter. Called
    on every rank. DeepSpeed's parameters come from the fp32 master copies its optimizer keeps."""
    if is_deepspeed(model):
        return _deepspeed_full_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _deepspeed_full_state(engine: Any) -> dict[str, torch.Tensor]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    main = dist.get_rank() == 0
    parameters = {id(p): p for p in engine.module.parameters()}
    gathered: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        if id(tensor) not in parameters:  # a buffer: every rank holds it whole
            value = tensor.detach()
        elif id(tensor) in gathered:  # a tied weight, gathered under its first name (on every rank)
            value = gathered[id(tensor)]
        else:
            value = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
            if value is None:  # frozen: no master copy (ZeRO-3: gathered from its partitions)
                with deepspeed.zero.GatheredParameters([tensor]):
                    value = tensor.detach().clone()
            value = value.detach().cpu() if main else None
            gathered[id(tensor)] = value
        if main:
            state[name] = value.cpu()
    return state
