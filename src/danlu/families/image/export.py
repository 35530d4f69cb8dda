"""Image export: the model takes uint8 pixels [batch, channels, height, width] and normalizes inside, so
the exported graph does too; it ends in softmax (classification) or the target's original units."""

import json

import numpy as np
import torch

from danlu.families.export import ExportSpec
from danlu.families.image import codec

INPUT = "images"


class ImageExport(ExportSpec):
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        s = self.state
        return (torch.zeros(2, s.channels, s.height, s.width, dtype=torch.uint8),)

    def input_names(self) -> list[str]:
        return [INPUT]

    def metadata(self) -> dict[str, str]:
        s = self.state
        return {
            "input": "uint8 images [batch, channels, height, width]; normalization is inside the graph",
            "image_size": json.dumps([s.height, s.width]),
            "channels": str(s.channels),
            "mean": json.dumps(s.mean),
            "std": json.dumps(s.std),
        }

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return codec.feeds(self.state, items)

    def script_args(self, items) -> tuple:
        return (codec.inputs(self.state, items)["images"],)
