"""Linear probes: an image run with `model.pretrained: CLIP_OR_SIGLIP_DIR` trains a linear head on the
frozen image tower's features. The tower runs once per image (its features cached under RUN/cache/,
keyed like the decoded images and by the model's weights), so an epoch costs the head alone; the finished
model is tower + head behind ImageModel, taking uint8 pixels like every image run (evaluate, predict,
export, serve).

The tower's architecture is stored in preprocess.json (its config), so a finished run rebuilds it without
model.pretrained and loads every weight from model.safetensors. The pixels are decoded at the tower's
input size and normalized with its image processor's mean and std inside the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from danlu.embeddings.detect import DEFAULT_TEMPLATE
from danlu.errors import DanluError

log = logging.getLogger("danlu")
# kind -> the transformers classes of the vision model inside CLIPModel / SiglipModel, and its config
TOWERS = {
    "clip": ("CLIPVisionModel", "CLIPVisionConfig"),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig"),
}


class Tower(nn.Module):
    """The image tower of CLIP (vision transformer + projection) or SigLIP (vision transformer with its
    pooling head), as the model's get_image_features computes it: normalized pixels [n, 3, h, w] ->
    unit-length features [n, dim]; frozen, always in eval mode."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None) -> None:
        super().__init__()
        self.vision, self.projection = vision, projection
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Tower:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=pixels).pooler_output
        if self.projection is not None:
            pooled = self.projection(pooled)
        return nn.functional.normalize(pooled.float(), dim=-1)


class ProbeNet(nn.Module):
    """Tower + linear head; the head alone when given features (the cached ones, in training)."""

    def __init__(self, tower: Tower, dimensions: int, outputs: int) -> None:
        super().__init__()
        self.tower, self.head = tower, nn.Linear(dimensions, outputs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels))


def pretrained_tower(
    path: str | Path, expected: dict[str, Any] | None = None
) -> tuple[Tower, dict[str, Any]]:
    """The image tower of a local CLIP or SigLIP directory, and what the run stores of it (kind, the
    vision config, the projection's width, input size, mean and std, dimensions, a fingerprint of the
    weights, the directory for the zero-shot baseline). expected: what a run stored, whose weights the
    directory must still hold. The last one loaded is kept: a run's data and its model share it.

    Raises:
        DanluError: the directory is missing, holds no CLIP or SigLIP model, or no longer the weights
            the run began with.
    """
    from danlu.embeddings.detect import IMAGE_TEXT, model_type

    where = Path(path).expanduser()
    kind = model_type(where) if where.is_dir() else None
    if kind not in IMAGE_TEXT:
        raise DanluError(
            f"model.pretrained '{path}' is no local CLIP or SigLIP directory (an image run's "
            "model.pretrained trains a linear probe on its image tower)",
            "pass a CLIP or SigLIP directory saved with save_pretrained, or leave out model.pretrained",
        )
    fingerprint = weights_fingerprint(where)
    if expected is not None and expected["weights"] != fingerprint:
        raise DanluError(
            f"the weights in model.pretrained '{path}' changed since the run began",
            "point model.pretrained at the model the run began with, or train again",
        )
    tower, info = _load_tower(str(where.resolve()), kind, fingerprint)
    return tower, dict(info)


@functools.lru_cache(maxsize=1)
def _load_tower(where: str, kind: str, fingerprint: str) -> tuple[Tower, dict[str, Any]]:
    from danlu.embeddings.encoders import load_image_text

    encoder = load_image_text(Path(where))
    model, processor = encoder.model, encoder.image_processor
    projection = getattr(model, "visual_projection", None)
    tower = Tower(model.vision_model, projection)
    size = getattr(processor, "crop_size", None) or processor.size
    height = int(size.get("height") or size.get("shortest_edge"))
    width = int(size.get("width") or size.get("shortest_edge"))
    info = {
        "kind": kind,
        "path": where,
        "vision_config": model.config.vision_config.to_dict(),
        "projection": None if projection is None else [projection.in_features, projection.out_features],
        "size": [height, width],
        "mean": [float(v) for v in processor.image_mean],
        "std": [float(v) for v in processor.image_std],
        "dimensions": encoder.dimensions,
        "weights": fingerprint,
    }
    return tower, info


def weights_fingerprint(path: Path) -> str:
    """sha256 over the weight files' names, sizes and modification times (cheap to recheck)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def tower_from_config(info: dict[str, Any]) -> Tower:
    """The tower's architecture from what the run stored, its weights left for model.safetensors."""
    import transformers

    from danlu.hf import quiet_transformers

    model_class, config_class = TOWERS[info["kind"]]
    with quiet_transformers():
        config = getattr(transformers, config_class).from_dict(info["vision_config"])
        vision = getattr(transformers, model_class)(config)
    projection = None if info["projection"] is None else nn.Linear(*info["projection"], bias=False)
    return Tower(vision, projection)


@torch.inference_mode()
def features(tower: Tower, images: np.ndarray, mean: list[float], std: list[float], device) -> np.ndarray:
    """Unit-length features [n, dim] float32 of uint8 images [n, h, w, 3], in batches, with a progress
    bar past a few batches."""
    from tqdm.auto import tqdm

    tower = tower.to(device)
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    scale = torch.tensor(std, device=device).view(1, -1, 1, 1)
    batch, parts = 64, []
    for start in tqdm(range(0, len(images), batch), desc="image features", disable=len(images) <= 4 * batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).to(device)
        pixels = (chunk.permute(0, 3, 1, 2).float() / 255.0 - shift) / scale
        parts.append(tower(pixels).float().cpu())
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(parts).numpy()


def cached_features(directory: Path | None, key: Callable[[], str], split: str, compute) -> np.ndarray:
    """compute()'s features, stored once as directory/features-KEY-SPLIT.npy and read back after (a
    resumed run); no directory: computed each time (and the key, which stats every file, not taken)."""
    if directory is None:
        return compute()
    from danlu.run import atomic_write

    path = directory / f"features-{key()}-{split}.npy"
    if path.is_file():
        return np.load(path)
    found = compute()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, found))
    return found


def zero_shot_accuracy(pretrained: str, classes: list[Any], features: np.ndarray, target: np.ndarray) -> dict:
    """The image-text model's own zero-shot accuracy on the held-out features, with the class names as
    labels in DEFAULT_TEMPLATE: the baseline the probe is measured against."""
    from danlu.embeddings.encoders import load_image_text

    encoder = load_image_text(Path(pretrained))
    probabilities = encoder.label_probabilities(
        features.astype(np.float32), [str(c) for c in classes], [DEFAULT_TEMPLATE]
    )
    accuracy = float((probabilities.argmax(axis=1) == target).mean()) if len(target) else None
    return {
        "zero_shot_accuracy": accuracy,
        "zero_shot_template": DEFAULT_TEMPLATE,
        "zero_shot_rows": len(target),
    }
