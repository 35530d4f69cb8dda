"""The exported graph takes the raw sequences, float32 [batch, length]."""

from __future__ import annotations

import numpy as np
import torch

from danlu.families.export import ExportSpec
from tests.toy_family.data import as_array


class SequenceExport(ExportSpec):
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, self.state.length),)

    def input_names(self) -> list[str]:
        return ["sequences"]

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return {"sequences": as_array(items)}

    def script_args(self, items) -> tuple:
        return (torch.from_numpy(as_array(items)),)
