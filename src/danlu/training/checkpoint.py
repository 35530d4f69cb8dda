"""Training checkpoints: full state for --resume, written atomically, loaded with weights_only=True.

A checkpoint is one file (checkpoints/last.pt, best.pt). A sharded run's (train.strategy=fsdp) holds the
loop state alone and names the folder beside it where every rank wrote its shard of the model and
optimizer with `torch.distributed.checkpoint` (checkpoints/shards-EPOCH/); the file is written after the
folder is complete, so either the old checkpoint or the new one is whole at any moment."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import __version__
from danlu.config import SCHEMA_VERSION
from danlu.errors import DanluError
from danlu.run import BEST_CHECKPOINT, LAST_CHECKPOINT, atomic_write, remove_shards
from danlu.training import zero_checkpoint

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCALER_KEY = "grad_scaler"
TRAINER_STATE_KEY = "trainer_state"  # epoch, step, best metric, early-stopping count, seconds
RANK_RNG_KEY = "rng_per_rank"
RNG_KEY = "rng"
CONFIG_KEY = "config"
VERSION_KEY = "danlu_version"
SCHEMA_VERSION_KEY = "schema_version"
SHARDS_KEY = "shards"  # a sharded checkpoint: the folder (in checkpoints/) that holds its shards
STRATEGY_KEY = "strategy"  # a sharded checkpoint: the train.strategy that wrote its shards
SHARDS_FOLDER = re.compile(r"^shards-\d{6}$")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/compile wrappers, so saved keys carry no `module.` prefix."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG state this process draws from: torch's, and on a CUDA run its own GPU's. A CPU run never
    touches CUDA, even where a GPU is visible: asking for every GPU's state would start a CUDA context on
    each of them in every rank (memory, and a CUDA runtime torn down at exit beside gloo's threads)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, list):  # checkpoints of danlu 0.1 held every visible GPU's state
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: all of them, or (trainable_only: a LoRA adapter's run, whose
    frozen base is read again from model.pretrained on resume) the trainable parameters alone."""
    bare = unwrap(model)
    state = bare.state_dict()
    if not trainable_only:
        return state
    trainable = {name for name, p in bare.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def restore_model(model: nn.Module, saved: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    """Load a checkpoint's weights into the model; with trainable_only, every trainable parameter must
    be among them and nothing else."""
    bare = unwrap(model)
    if not trainable_only:
        bare.load_state_dict(saved)
        return
    trainable = {name for name, p in bare.named_parameters() if p.requires_grad}
    if set(saved) != trainable:
        raise DanluError(
            "the checkpoint's weights are not this run's trainable parameters", "train again without --resume"
        )
    bare.load_state_dict(saved, strict=False)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    rng_states: list[dict[str, Any]],
    trainable_only: bool = False,
) -> None:
    """rng_states: every rank's RNG state (rank_state's), rank 0's first (also stored as RNG_KEY)."""
    checkpoint = {
        MODEL_KEY: model_state(model, trainable_only),
        OPTIMIZER_KEY: optimizer.state_dict(),
        **_loop_state(scaler, trainer_state, config, rng_states),
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def _loop_state(scaler, trainer_state, config, rng_states) -> dict[str, Any]:
    state = {
        TRAINER_STATE_KEY: trainer_state,
        RNG_KEY: rng_states[0],
        CONFIG_KEY: config,
        VERSION_KEY: __version__,
        SCHEMA_VERSION_KEY: SCHEMA_VERSION,
    }
    if len(rng_states) > 1:
        state[RANK_RNG_KEY] = rng_states
    if scaler is not None and scaler.is_enabled():
        state[SCALER_KEY] = scaler.state_dict()
    return state


def save_sharded(
    paths: list[Path],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    rng_states: list[dict[str, Any]] | None,
    trainable_only: bool,
    world: Any,
) -> None:
    """Called on every rank: each writes its shards once into checkpoints/shards-EPOCH/ (in a temporary
    folder first), then rank 0 (rng_states: every rank's, gathered there) writes each file in `paths`
    naming it, and removes the shard folders no checkpoint names any more. A DeepSpeed engine writes
    its partitions' fragments (zero_checkpoint); any other model, torch.distributed.checkpoint's."""
    import torch.distributed.checkpoint as dcp

    from danlu.training import distributed, sharding

    folder = paths[0].parent
    name = f"shards-{trainer_state['epoch']:06d}"
    writing = folder / f".{name}.writing.tmp"
    if world.main and writing.exists():
        remove_shards(writing)  # left by a run stopped while it wrote
    distributed.barrier(world)
    if sharding.is_deepspeed(model):
        writing.mkdir(parents=True, exist_ok=True)
        zero_checkpoint.save(model, writing, world.rank, world.size)
        distributed.barrier(world)  # every rank's file is written before rank 0 renames the folder
    else:
        with _single_process_quiet():
            dcp.save(_sharded_state(model, optimizer, trainable_only), checkpoint_id=writing)
    if not world.main:
        return
    final = folder / name
    # written by a stopped run before a checkpoint named it (a resume replays the epoch)
    if final.exists() and remove_shards(final):
        raise DanluError(
            f"'{final}' holds files danlu did not write; nothing was replaced",
            "move them out of the run's checkpoints/ and resume again",
        )
    writing.rename(final)
    record = {
        SHARDS_KEY: name,
        STRATEGY_KEY: config["train"]["strategy"],
        **_loop_state(scaler, trainer_state, config, rng_states),
    }
    for path in paths:
        atomic_write(path, lambda f: torch.save(record, f))
    others = [p for p in (folder / LAST_CHECKPOINT, folder / BEST_CHECKPOINT) if p not in paths]
    named = {name} | {load_checkpoint(p).get(SHARDS_KEY) for p in others if p.is_file()}
    for entry in folder.iterdir():
        if entry.is_dir() and SHARDS_FOLDER.match(entry.name) and entry.name not in named:
            remove_shards(entry)  # a user's file in it stays, with its folder


def load_sharded(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool
) -> None:
    """Every rank reads its own shards of a sharded checkpoint's model (and optimizer), whatever the
    number of processes that wrote it: torch.distributed.checkpoint reshards on load, and a DeepSpeed
    engine reads the ranges of its own partition from its fragments (zero_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from danlu.training import sharding

    if sharding.is_deepspeed(model):
        import torch.distributed as dist

        zero_checkpoint.load(model, folder, dist.get_rank(), with_optimizer=optimizer is not None)
        return
    state = _sharded_state(model, optimizer, trainable_only)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=folder)
    except Exception as exc:  # a missing folder, or shards of another model
        raise DanluError(
            f"cannot load the sharded checkpoint '{folder}': {exc}".splitlines()[0],
            "the checkpoint is damaged or not this run's; train again",
        ) from None
    # the kernels are this world's choice (no fused SGD over sharded parameters), not the writer's
    kernels = [{k: g[k] for k in _KERNEL_OPTIONS if k in g} for g in getattr(optimizer, "param_groups", [])]
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
        options=StateDictOptions(strict=not trainable_only),
    )
    for group, chosen in zip(getattr(optimizer, "param_groups", []), kernels, strict=True):
        group.update(chosen)


_KERNEL_OPTIONS = ("fused", "foreach")


def _sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        weights, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": weights, "optimizer": optimizer_state}
    if trainable_only:
        trainable = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
        state["model"] = {k: v for k, v in state["model"].items() if k in trainable}
    return state


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes one process when no group exists: that is
    how a sharded run goes on (or ends) in one process, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single")
        yield


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise DanluError(
            f"no checkpoint at '{path}'", "the run stopped before its first checkpoint; train again"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file raises many types
        raise DanluError(
            f"cannot load checkpoint '{path}': {exc}".splitlines()[0], "the file is damaged; train again"
        ) from None
