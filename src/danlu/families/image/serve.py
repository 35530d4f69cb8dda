"""Serving image runs: images as base64 in JSON (`{"images": ["<base64 PNG/JPEG...>", ...]}`) or as the
files of a multipart upload. Before any is decoded, their headers are read and their pixels counted: a
request over MAX_REQUEST_PIXELS in all is refused whole (413). Then each is decoded and checked on its
own, so one bad image is a 422 naming it and never reaches the model. The server runs all of this on its
parsing threads (the family's `heavy_requests`), never on the event loop."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from danlu.errors import DanluError
from danlu.families.image.decode import FORMATS_READ, decode_opened, open_image
from danlu.families.image.state import ImageState

# Pixels of the images of one request, as sent (before resizing): about 25 photos of 4 megapixels.
MAX_REQUEST_PIXELS = 100_000_000


def request_model(state: ImageState, max_rows: int) -> type[BaseModel]:
    class ImageRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", title="ImageRequest")
        images: list[str] = Field(
            min_length=1,
            max_length=max_rows,
            description=f"base64 image files ({FORMATS_READ}), or data: URLs; resized to "
            f"{state.width}x{state.height}, {'grayscale' if state.channels == 1 else 'RGB'}; at most "
            f"{MAX_REQUEST_PIXELS:,} pixels in all",
        )

    return ImageRequest


def _error(i: int, message: str) -> dict[str, Any]:
    return {"loc": ["body", "images", i], "msg": message, "type": "value_error"}


def decode_files(state: ImageState, files: list[bytes]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Image files to the model's size and channels: their headers read first, and refused whole when
    their pixels add up to more than MAX_REQUEST_PIXELS (an error of type "too_large"), else each
    decoded on its own."""
    errors, opened = [], []
    for i, data in enumerate(files):
        try:
            opened.append(open_image(data, f"images[{i}]", load=False))
        except DanluError as error:
            errors.append(_error(i, error.message))
    pixels = sum(image.width * image.height for image in opened)
    if pixels > MAX_REQUEST_PIXELS:
        message = (
            f"the images have {pixels:,} pixels in all, over the limit of {MAX_REQUEST_PIXELS:,} per request"
        )
        return [], [
            {"loc": ["body", "images"], "msg": message + "; send fewer or smaller", "type": "too_large"}
        ]
    if errors:
        return [], errors
    images = []
    for i, image in enumerate(opened):
        try:
            images.append(decode_opened(image, state.size, state.channels, f"images[{i}]"))
        except DanluError as error:
            errors.append(_error(i, error.message))
    return images, errors


def request_items(state: ImageState, body) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    files, errors = [], []
    for i, text in enumerate(body.images):
        try:
            data = text.split(",", 1)[1] if text.startswith("data:") else text
            files.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            errors.append(_error(i, "not base64"))
    return ([], errors) if errors else decode_files(state, files)


def form_items(state: ImageState, files: list[bytes]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """A multipart upload's files, in order (any field name)."""
    if not files:
        return [], [{"loc": ["body", "images"], "msg": "no image files in the upload", "type": "missing"}]
    return decode_files(state, files)


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
