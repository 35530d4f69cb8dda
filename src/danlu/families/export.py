"""What every family's export shares: the serving module's output tail (softmax, or the target back in its
original units) and the export spec's defaults. `danlu.export` (ONNX, TorchScript) and the runners of
exported files (`danlu.runners`) call a family's spec and nothing else of it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


class OutputTail(nn.Module):
    """Raw model outputs -> probabilities [n, k] (classification) or values in the target's units [n]."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.classification = state.task == "classification"
        self.target_mean, self.target_std = float(state.head.mean), float(state.head.std)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.reshape(-1) * self.target_std + self.target_mean


class Served(nn.Module):
    """The model on its inputs, then the output tail: what most families export."""

    def __init__(self, model: nn.Module, state: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.tail = OutputTail(state)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.tail(self.model(*inputs))


class ExportSpec:
    """What `danlu export` needs from a family: the module to trace and how to feed the exported file.

    A family's spec sets `example_inputs`, `input_names`, `onnx_feeds` and `script_args`; the rest has a
    default here."""

    # axes of every input that vary between calls: rows always; a family names more (texts: tokens)
    dynamic_axes: ClassVar[dict[int, str]] = {0: "batch"}

    def __init__(self, state: Any) -> None:
        self.state = state

    def module(self, model: nn.Module) -> nn.Module:
        """The torch module to export: the model with its output tail."""
        return Served(model, self.state)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing, with more than one row so the batch axis stays dynamic."""
        raise NotImplementedError

    def input_names(self) -> list[str]:
        raise NotImplementedError

    def onnx_feeds(self, items: Any) -> dict[str, np.ndarray]:
        """The exported graph's inputs for items."""
        raise NotImplementedError

    def script_args(self, items: Any) -> tuple:
        """The TorchScript module's arguments for items."""
        raise NotImplementedError

    def output_name(self) -> str:
        return "probabilities" if self.state.task == "classification" else "prediction"

    def metadata(self) -> dict[str, str]:
        """What a consumer needs to know about the inputs, as strings."""
        return {}

    def finish_onnx(self, proto: Any) -> None:
        """Edit the exported ONNX graph in place (tables: string lookups in front)."""
        return None

    def script(self, traced: nn.Module) -> nn.Module:
        """The TorchScript module around the traced one (tables: a scripted string lookup)."""
        return traced

    def chunks(self, items: Any) -> Iterable[Any]:
        """items in the passes an exported graph runs them in: all at once, unless a family says
        otherwise (texts: a few at a time, since every pass holds activations for each token)."""
        return [items]
