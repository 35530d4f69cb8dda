"""The image family's fitted state: the model's image size and channels, the per-channel mean and std of
the training pixels (in [0, 1]), and the target's classes; stored as preprocess.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu.families.target import Target, TargetSide, read_state_json, state_json

FORMAT_VERSION = 1


@dataclass
class ImageState(TargetSide):
    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: list[float]
    std: list[float]
    head: Target
    image_column: str | None = None  # the path column of a CSV/Parquet source

    family = "image"

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "family": self.family,
            **self.head.to_dict(),
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
            "image_column": self.image_column,
            "input": "uint8 images [batch, channels, height, width]",
        }
        return state_json(data)

    @classmethod
    def from_json(cls, text: str) -> ImageState:
        data = read_state_json(text, FORMAT_VERSION)
        return cls(
            data["height"],
            data["width"],
            data["channels"],
            data["mean"],
            data["std"],
            Target.from_dict(data),
            data.get("image_column"),
        )
