"""Text export: the encoder and head take token ids and the attention mask (int64 [batch, tokens]);
tokenization stays outside the graph (the tokenizer files are in RUN/hf). The graph ends in softmax
(classification) or the target's original units."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from danlu.families.export import ExportSpec
from danlu.families.text import codec

INPUTS = ["input_ids", "attention_mask"]
RUN_ROWS = 64  # texts per pass of an exported graph (verification, --engine onnx)


class TextExport(ExportSpec):
    # both inputs vary in batch size (axis 0) and in tokens (axis 1)
    dynamic_axes: ClassVar[dict[int, str]] = {0: "batch", 1: "tokens"}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        ids = torch.full((2, 16), self.state.pad_id, dtype=torch.long)
        mask = torch.ones((2, 16), dtype=torch.long)
        mask[0, 8:] = 0
        return ids, mask

    def input_names(self) -> list[str]:
        return INPUTS

    def metadata(self) -> dict[str, str]:
        return {
            "input": "input_ids and attention_mask, int64 [batch, tokens], from the tokenizer in RUN/hf "
            "(tokenization is outside the graph)",
            "text_column": self.state.text_column,
            "max_length": str(self.state.max_length),
            "pad_id": str(self.state.pad_id),
        }

    def chunks(self, items):
        return codec.chunks(items, RUN_ROWS)

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return codec.feeds(self.state, items)

    def script_args(self, items) -> tuple:
        return tuple(codec.inputs(self.state, items).values())
