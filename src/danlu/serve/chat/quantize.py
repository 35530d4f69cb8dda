"""--quantize for chat models. On CUDA, bitsandbytes: int8 (LLM.int8) or nf4 (4-bit NormalFloat), applied
by transformers while loading. On the CPU, int8 weight-only: every Linear keeps its weights as int8 with one
scale per output channel (absmax / 127) and multiplies with torch's packed int8 kernel on bf16 activations;
the embeddings and norms stay as loaded."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from danlu.errors import DanluError

CHOICES = ("int8", "nf4")


def check_quantize(quantize: str | None, device: torch.device) -> None:
    if quantize is None:
        return
    if quantize not in CHOICES:
        raise DanluError(f"unknown --quantize '{quantize}'", f"use one of {', '.join(CHOICES)}")
    if device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # ImportError, or a build without this CUDA's binary
            raise DanluError(
                f"--quantize {quantize} on CUDA needs bitsandbytes, which does not import here "
                f"({type(exc).__name__})",
                "pip install bitsandbytes (`danlu doctor` checks the build against this CUDA)",
            ) from None
    elif quantize == "nf4":
        raise DanluError("--quantize nf4 needs a CUDA GPU (bitsandbytes)", "on the CPU use --quantize int8")
    elif device.type != "cpu":
        raise DanluError(f"--quantize is not available on '{device}'", "use --device cpu or cuda")


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with a per-output-channel scale: y = (x @ q.T) * scale + bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernel's fast path is bf16 on CPU
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8_cpu(model: nn.Module) -> int:
    """Replace every nn.Linear in place, one at a time so the float weights are freed as it goes; returns
    how many. Tied output weights become their own int8 copy, so the embedding keeps its precision."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the output layer is no longer the embedding
    return len(names)


def return_freed_memory() -> None:
    """Hand freed loading buffers and float weights back to the OS: glibc keeps freed blocks in its
    arenas. Elsewhere (no malloc_trim) this process reuses them anyway."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
