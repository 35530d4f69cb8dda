"""Decoding images with Pillow into uint8 arrays [h, w, c] of the model's size and channels.

Only the formats in FORMATS are opened: Pillow would otherwise try every plugin it has, some of which
run other programs (EPS runs Ghostscript where it is installed) or parse rarely used formats. Pillow's
decompression-bomb limit stays on; a file that is not an image in those formats, is truncated, or is too
large is a DanluError naming it (or, in training with data.skip_bad_images, skipped and counted)."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import DanluError

MAX_PIXELS = 64 * 1024 * 1024  # an image larger than this is refused (Pillow warns at 89M, fails at 179M)
# Pillow's names of the formats danlu reads (its JPEG reader also opens phone cameras' multi-picture files)
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
FORMATS_READ = "PNG, JPEG, BMP, WebP, GIF, TIFF"


@functools.cache
def _pil():
    """PIL's Image, with the readers of FORMATS registered: Image.open(formats=...) looks only among
    registered readers, and the other plugins are never loaded."""
    from PIL import (  # noqa: F401 (imported to register them)
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    return Image


def from_pil(image, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    if channels is not None:
        mode = "L" if channels == 1 else "RGB"
        image = image if image.mode == mode else image.convert(mode)
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
    if size is not None and (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), _pil().Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


@contextlib.contextmanager
def _readable(name: str) -> Iterator[None]:
    """Pillow's ways of saying "not an image, too large, truncated" as one DanluError naming the image."""
    Image = _pil()
    try:
        yield
    except Image.DecompressionBombError:
        raise DanluError(f"{name} is a decompression bomb (too many pixels)", "send a real image") from None
    except Image.UnidentifiedImageError:
        raise DanluError(
            f"{name} is not an image in a format danlu reads ({FORMATS_READ})", "convert it to PNG or JPEG"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DanluError(f"{name} is not a readable image ({exc})", "check or remove that file") from None


def open_image(source: str | Path | bytes, name: str, load: bool = True):
    """A Pillow image, fully loaded (or only its header read, with load=False); raises DanluError for
    anything that is not a readable, sane image."""
    with _readable(name):
        image = _pil().open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
        if image.width * image.height > MAX_PIXELS:
            raise DanluError(
                f"{name} has {image.width}x{image.height} pixels, over the limit of {MAX_PIXELS}",
                "send a smaller image",
            )
        if load:
            image.load()
    return image


def decode_opened(image, size: tuple[int, int] | None, channels: int | None, name: str) -> np.ndarray:
    """An image opened with load=False (its header read), decoded to the model's size and channels."""
    with _readable(name):
        image.load()
    return from_pil(image, size, channels)


def decode(source: str | Path | bytes, size: tuple[int, int] | None, channels: int | None, name: str):
    return from_pil(open_image(source, name), size, channels)


def to_array(data: Any, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image from what the Python API accepts: a path, bytes, a PIL image or a uint8 array
    ([h, w] or [h, w, c]), as uint8 [h, w, c] at the model's size and channels."""
    if isinstance(data, (str, Path)):
        return decode(data, size, channels, f"'{data}'")
    if isinstance(data, bytes):
        return decode(data, size, channels, "the image")
    if hasattr(data, "convert") and hasattr(data, "resize"):  # a PIL image
        return from_pil(data, size, channels)
    array = np.asarray(data)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise DanluError(
            f"an image array must be uint8 [h, w] or [h, w, c], got {array.dtype} {array.shape}",
            "pass uint8 pixels, a PIL image or a file path",
        )
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise DanluError(
            f"an image array has {array.shape[2]} channels", "pass 1 (gray), 3 (RGB) or 4 (RGBA)"
        )
    return from_pil(pil_from_array(array), size, channels)


def pil_from_array(array: np.ndarray):
    """A PIL image of uint8 pixels [h, w] or [h, w, 1 | 3 | 4] (grayscale, RGB, RGBA)."""
    return _pil().fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
