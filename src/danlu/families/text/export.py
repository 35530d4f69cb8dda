"""Text export: the encoder and head take token ids and the attention mask (int64 [batch, tokens]);
tokenization stays outside the graph (the tokenizer files are in RUN/hf). The graph ends in softmax
(classification) or the target's original units."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from danlu.families.text import codec
from danlu.families.text.state import TextState

INPUTS = ["input_ids", "attention_mask"]
RUN_ROWS = 64  # texts per pass of an exported graph (verification, --engine onnx)


class ServingModule(nn.Module):
    def __init__(self, model: nn.Module, state: TextState) -> None:
        super().__init__()
        self.model = model.eval()
        self.classification = state.task == "classification"
        self.target_mean, self.target_std = float(state.head.mean), float(state.head.std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, attention_mask)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.reshape(-1) * self.target_std + self.target_mean


class TextExport:
    """What `danlu export` needs from the text family (see danlu.export)."""

    # both inputs vary in batch size (axis 0) and in tokens (axis 1)
    dynamic_axes: ClassVar[dict[int, str]] = {0: "batch", 1: "tokens"}

    def __init__(self, state: TextState) -> None:
        self.state = state

    def module(self, model: nn.Module) -> nn.Module:
        return ServingModule(model, self.state)

    def example_inputs(self, rows: int = 2) -> tuple[torch.Tensor, ...]:
        ids = torch.full((rows, 16), self.state.pad_id, dtype=torch.long)
        mask = torch.ones((rows, 16), dtype=torch.long)
        mask[0, 8:] = 0
        return ids, mask

    def input_names(self) -> list[str]:
        return INPUTS

    def output_name(self) -> str:
        return "probabilities" if self.state.task == "classification" else "prediction"

    def metadata(self) -> dict[str, str]:
        return {
            "input": "input_ids and attention_mask, int64 [batch, tokens], from the tokenizer in RUN/hf "
            "(tokenization is outside the graph)",
            "text_column": self.state.text_column,
            "max_length": str(self.state.max_length),
            "pad_id": str(self.state.pad_id),
        }

    def finish_onnx(self, proto) -> None:
        return None

    def chunks(self, items):
        """Exported graphs run a few texts at a time: each pass holds activations for every token."""
        return codec.chunks(items, RUN_ROWS)

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return codec.feeds(self.state, items)

    def script(self, traced: nn.Module) -> nn.Module:
        return traced

    def script_args(self, items) -> tuple:
        return tuple(codec.inputs(self.state, items).values())
