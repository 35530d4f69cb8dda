"""Which local directories hold an encoder danlu embeds with, read from their JSON files alone (no torch:
the CLI asks before it imports anything heavy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from danlu.errors import DanluError

IMAGE_TEXT = {"clip": "CLIPModel", "siglip": "SiglipModel"}  # model_type -> transformers class
DEFAULT_TEMPLATE = "a photo of a {}."  # the prompt a label fills unless told otherwise (CLI, server, probes)
TRUNCATE = ("end", "start", "error")  # what becomes of a text over the model's limit


def local_model_dir(spec: str | Path) -> Path:
    """SPEC as a local directory; DanluError for anything else (a hub id among them: danlu never
    downloads)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DanluError(
            f"'{spec}' is no local model directory (danlu reads models from local files, never a hub)",
            "download it yourself, then pass its local path",
        )
    return path


def model_type(path: Path) -> str | None:
    """The config's model_type of a local directory, None without a readable config.json."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_text_encoder(path: Path) -> bool:
    """A sentence-transformers directory, or one whose config names an encoder-only architecture."""
    if (path / "modules.json").is_file():
        return True
    config = json_file(path / "config.json") or {}
    architectures = [str(a) for a in config.get("architectures") or []]
    return bool(architectures) and all(a.endswith(("Model", "ForMaskedLM")) for a in architectures)


def is_encoder_model(spec: str | Path) -> bool:
    """A local CLIP, SigLIP or encoder-only text directory that is no danlu run."""
    path = Path(spec).expanduser()
    if not path.is_dir() or (path / "preprocess.json").is_file():
        return False
    return model_type(path) in IMAGE_TEXT or is_text_encoder(path)
