"""Running a model: device choice, the forward convention, and batched outputs (shared by training,
evaluation and prediction)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from danlu.data.batches import Batch, run_model
from danlu.errors import DanluError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit accelerator that is missing is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DanluError(
            "train.device=cuda but torch sees no CUDA GPU",
            "use train.device=cpu, or install a CUDA build of torch (see README)",
        )
    if name == "mps" and not has_mps:
        raise DanluError("train.device=mps but MPS is not available", "use train.device=cpu")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision that runs: fp16 needs a GPU; bf16 a GPU or CPU that supports it; auto picks bf16
    where it is supported, else fp32."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    else:
        bf16 = False
    if precision == "auto":
        return "bf16" if bf16 else "fp32"
    if (precision == "bf16" and not bf16) or (precision == "fp16" and device.type != "cuda"):
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on accelerators, bf16 on the CPU too; fp32 (a no-op context) otherwise."""
    if precision == "fp32" or (device.type == "cpu" and precision != "bf16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def iter_outputs(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Raw model outputs (float32) and encoded targets, batch by batch, in order, in eval mode."""
    was_training = model.training
    if was_training:  # train()/eval() walk every submodule: a served model in eval mode skips both
        model.eval()
    try:
        for batch in batches:
            with torch.no_grad(), autocast(device, precision):
                out = run_model(model, batch.to(device))
            yield out.float().cpu().numpy(), batch.target.cpu().numpy()
    finally:
        if was_training:
            model.train()


def collect_outputs(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw model outputs and encoded targets for every batch, concatenated."""
    pairs = list(iter_outputs(model, batches, device, precision))
    if not pairs:
        return np.empty((0, 0), dtype=np.float32), np.empty(0)
    return np.concatenate([o for o, _ in pairs]), np.concatenate([t for _, t in pairs])
