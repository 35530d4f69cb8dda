"""The image family's fitted state: the model's image size and channels, the per-channel mean and std of
the training pixels (in [0, 1]), and the target's classes; stored as preprocess.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.families.target import FamilyState, Target


@dataclass
class ImageState(FamilyState):
    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: list[float]
    std: list[float]
    head: Target
    image_column: str | None = None  # the path column of a CSV/Parquet source
    # a linear probe's frozen image tower (danlu.families.image.probe): kind, config, size, mean, std
    tower: dict[str, Any] | None = None
    run_dir: Path | None = field(default=None, compare=False)  # a finished run's directory (bind)

    family = "image"

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def json_fields(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
            "image_column": self.image_column,
            "tower": self.tower,
            "input": "uint8 images [batch, channels, height, width]",
        }

    @classmethod
    def from_json_fields(cls, data: dict[str, Any], head: Target) -> ImageState:
        return cls(
            data["height"],
            data["width"],
            data["channels"],
            data["mean"],
            data["std"],
            head,
            data.get("image_column"),
            data.get("tower"),
        )
