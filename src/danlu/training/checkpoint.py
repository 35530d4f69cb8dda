"""Training checkpoints: full state for --resume, written atomically, loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu import __version__
from danlu.config import SCHEMA_VERSION
from danlu.errors import DanluError
from danlu.run import atomic_write

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCALER_KEY = "grad_scaler"
TRAINER_STATE_KEY = "trainer_state"  # epoch, step, best metric, early-stopping count, seconds
RANK_RNG_KEY = "rng_per_rank"
RNG_KEY = "rng"
CONFIG_KEY = "config"
VERSION_KEY = "danlu_version"
SCHEMA_VERSION_KEY = "schema_version"


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
        TRAINER_STATE_KEY: trainer_state,
        RNG_KEY: rng_states[0],
        CONFIG_KEY: config,
        VERSION_KEY: __version__,
        SCHEMA_VERSION_KEY: SCHEMA_VERSION,
    }
    if len(rng_states) > 1:
        checkpoint[RANK_RNG_KEY] = rng_states
    if scaler is not None and scaler.is_enabled():
        checkpoint[SCALER_KEY] = scaler.state_dict()
    atomic_write(path, lambda f: torch.save(checkpoint, f))


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
