"""Inference weights as safetensors: no pickle, no `module.` prefixes, loadable anywhere."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save
from torch import nn

from danlu import __version__
from danlu.errors import DanluError
from danlu.run import DAMAGED, atomic_write


def save_weights(model: nn.Module, path: Path) -> None:
    from danlu.training.checkpoint import unwrap

    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    data = save(tensors, metadata={"format": "pt", "danlu_version": __version__})
    atomic_write(path, lambda f: f.write(data))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    try:
        state = load_file(str(path))
    except Exception as exc:  # missing, truncated or not safetensors
        raise DanluError(f"cannot load weights '{path}': {exc}", DAMAGED) from None
    model.load_state_dict(state)
    return model
