"""Serving image runs: images as base64 in JSON (`{"images": ["<base64 PNG/JPEG...>", ...]}`), each
decoded and checked on its own, so one bad image is a 422 naming it and never reaches the model."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from danlu.errors import DanluError
from danlu.families.image.decode import decode
from danlu.families.image.state import ImageState


def request_model(state: ImageState, max_rows: int) -> type[BaseModel]:
    class ImageRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", title="ImageRequest")
        images: list[str] = Field(
            min_length=1,
            max_length=max_rows,
            description=f"base64 image files (PNG, JPEG, BMP, WebP), or data: URLs; resized to "
            f"{state.width}x{state.height}, {'grayscale' if state.channels == 1 else 'RGB'}",
        )

    return ImageRequest


def request_items(state: ImageState, body) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    images, errors = [], []
    for i, text in enumerate(body.images):
        where = ["body", "images", i]
        try:
            data = base64.b64decode(
                text.split(",", 1)[1] if text.startswith("data:") else text, validate=True
            )
        except (binascii.Error, ValueError):
            errors.append({"loc": where, "msg": "not base64", "type": "value_error"})
            continue
        try:
            images.append(decode(data, state.size, state.channels, f"images[{i}]"))
        except DanluError as error:
            errors.append({"loc": where, "msg": error.message, "type": "value_error"})
    return images, errors


async def form_items(state: ImageState, form) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """A multipart upload: every file part, in order (any field name), decoded and checked on its own."""
    files = [value for _, value in form.multi_items() if hasattr(value, "read")]
    if not files:
        return [], [{"loc": ["body", "images"], "msg": "no image files in the upload", "type": "missing"}]
    images, errors = [], []
    for i, file in enumerate(files):
        try:
            images.append(decode(await file.read(), state.size, state.channels, f"images[{i}]"))
        except DanluError as error:
            errors.append({"loc": ["body", "images", i], "msg": error.message, "type": "value_error"})
    return images, errors


def warmup_items(state: ImageState) -> list[np.ndarray]:
    return [np.zeros((state.height, state.width, state.channels), dtype=np.uint8)]


def description(state: ImageState) -> str:
    return f"{state.width}x{state.height} {'grayscale' if state.channels == 1 else 'RGB'} images"


def metadata(state: ImageState) -> dict[str, Any]:
    return {"height": state.height, "width": state.width, "channels": state.channels}


def page_form(state: ImageState) -> dict[str, Any]:
    """One image, chosen from a file or, for small grayscale models (digits), drawn on a canvas."""
    draw = state.channels == 1 and state.height <= 64 and state.width <= 64
    gray = ", grayscale" if state.channels == 1 else ""
    field = {"name": "image", "kind": "upload", "draw": draw}
    return {
        "hint": f"Choose an image (resized to {state.width}x{state.height}{gray})"
        + (" or draw one below" if draw else "")
        + ", then press Predict.",
        "fields": [field],
        "request": {"shape": "list", "key": "images"},
    }
