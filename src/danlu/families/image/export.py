"""Image export: the model takes uint8 pixels [batch, channels, height, width] and normalizes inside, so
the exported graph does too; it ends in softmax (classification) or the target's original units."""

import json

import numpy as np
import torch
from torch import nn

from danlu.families.image import codec
from danlu.families.image.state import ImageState

INPUT = "images"


class ServingModule(nn.Module):
    def __init__(self, model: nn.Module, state: ImageState) -> None:
        super().__init__()
        self.model = model.eval()
        self.classification = state.task == "classification"
        self.target_mean, self.target_std = float(state.head.mean), float(state.head.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.reshape(-1) * self.target_std + self.target_mean


class ImageExport:
    """What `danlu export` needs from the image family (see danlu.export)."""

    def __init__(self, state: ImageState) -> None:
        self.state = state

    def module(self, model: nn.Module) -> nn.Module:
        return ServingModule(model, self.state)

    def example_inputs(self, rows: int = 2) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(rows, self.state.channels, self.state.height, self.state.width, dtype=torch.uint8),
        )

    def input_names(self) -> list[str]:
        return [INPUT]

    def output_name(self) -> str:
        return "probabilities" if self.state.task == "classification" else "prediction"

    def metadata(self) -> dict[str, str]:
        s = self.state
        return {
            "input": "uint8 images [batch, channels, height, width]; normalization is inside the graph",
            "image_size": json.dumps([s.height, s.width]),
            "channels": str(s.channels),
            "mean": json.dumps(s.mean),
            "std": json.dumps(s.std),
        }

    def finish_onnx(self, proto) -> None:
        return None

    def onnx_feeds(self, items) -> dict[str, np.ndarray]:
        return codec.feeds(self.state, items)

    def script(self, traced: nn.Module) -> nn.Module:
        return traced

    def script_args(self, items) -> tuple:
        return (codec.inputs(self.state, items)["images"],)
