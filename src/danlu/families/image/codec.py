"""Image items (decoded uint8 images with their names and, when known, labels) to model inputs, targets
and prediction files; reading sources for evaluate/predict; held-out images stored as NPZ."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.errors import DanluError
from danlu.families.image.decode import from_pil, pil_from_array, to_array
from danlu.families.image.sources import ImageSource, open_source
from danlu.families.image.state import ImageState

READ_IMAGES = 1024  # images decoded per chunk when reading a source


@dataclass
class ImageItems:
    images: np.ndarray  # uint8 [n, h, w, c] at the model's size and channels
    names: list[str]
    labels: pd.Series | None = None

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def count(items: ImageItems | list[np.ndarray]) -> int:
    return len(items.images) if isinstance(items, ImageItems) else len(items)


def nbytes(items: ImageItems) -> int:
    return items.nbytes


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def inputs(state: ImageState, items: ImageItems | list[np.ndarray]) -> dict[str, torch.Tensor]:
    """{"images": uint8 [n, c, h, w]}: the model normalizes inside, so exports take raw pixels too."""
    images = items.images if isinstance(items, ImageItems) else np.stack(items)
    return {"images": to_nchw(images)}


def targets(state: ImageState, items: ImageItems) -> np.ndarray:
    if items.labels is None:
        raise DanluError(
            "these images have no labels",
            "evaluate a folder with one subfolder per class, a CSV with the target column, or IDX/NPZ labels",
        )
    return state.decode_target(state.encode_target(items.labels.reset_index(drop=True)))


def decode_items(
    source: ImageSource, indices: np.ndarray, state: ImageState, skip_bad: bool = False, out=None
) -> tuple[ImageItems, np.ndarray]:
    """The source's images at `indices`, decoded to the model's size and channels: (items, kept indices).

    out: an array [len(indices), h, w, c] to decode into (a memory-mapped cache), else a new array."""
    if source.paths is not None:  # files: one pass that reads, hashes and decodes each
        from danlu.families.image.reader import Geometry, read_images

        geometry = Geometry(state.size, state.channels)
        _, [(images, kept)] = read_images(source, [indices], geometry, skip_bad, [out])
    else:  # IDX or NPZ: decoded arrays, resized and converted where the model needs it
        images = out if out is not None else np.empty((len(indices), *state.size, state.channels), np.uint8)
        for row, i in enumerate(indices):
            images[row] = from_pil(pil_from_array(source.arrays[i]), state.size, state.channels)
        kept = np.asarray(indices, dtype=np.int64)
    labels = None if source.labels is None else source.labels.iloc[kept].reset_index(drop=True)
    return ImageItems(images[: len(kept)], source.names(kept), labels), kept


def read(
    spec: str, state: ImageState, chunk_rows: int = READ_IMAGES, skipped: list[str] | None = None
) -> Iterator[ImageItems]:
    """A folder (labelled by subfolder, or flat), a CSV/Parquet of paths (labelled when it has the
    target column), IDX/NPZ, or one image file, decoded a chunk at a time. An unreadable or missing image
    is an error naming it; with `skipped` given, it is left out and its name appended there instead."""
    path = Path(spec)
    target = state.target
    if path.suffix.lower() in (".csv", ".parquet", ".pq"):
        from danlu.data.sources import open_table

        columns = open_table(spec).columns
        target = target if target in columns else None
    source = open_source(spec, state.image_column, target)
    for start in range(0, len(source), chunk_rows):
        indices = np.arange(start, min(start + chunk_rows, len(source)))
        items, kept = decode_items(source, indices, state, skipped is not None)
        if skipped is not None and len(kept) < len(indices):
            skipped.extend(source.names(np.setdiff1d(indices, kept)))
        if count(items):
            yield items


def _is_batch(data: Any) -> bool:
    """A list, or a uint8 array of several images: [n, h, w, c], or [n, h, w] (a last axis that is not
    1, 3 or 4 channels)."""
    if isinstance(data, (list, tuple)):
        return True
    if not isinstance(data, np.ndarray):
        return False
    return data.ndim == 4 or (data.ndim == 3 and data.shape[2] not in (1, 3, 4))


def as_items(state: ImageState, data: Any) -> ImageItems:
    """A path, bytes, a PIL image, a uint8 array, ImageItems, or several of them (a list or an array)."""
    if isinstance(data, ImageItems):
        return data
    many = list(data) if _is_batch(data) else [data]
    arrays = [to_array(d, state.size, state.channels) for d in many]
    names = [str(d) if isinstance(d, (str, Path)) else f"#{i}" for i, d in enumerate(many)]
    stack = np.stack(arrays) if arrays else np.empty((0, *state.size, state.channels), np.uint8)
    return ImageItems(stack, names)


def output_frame(state: ImageState, items: ImageItems, decoded: np.ndarray) -> pd.DataFrame:
    """path, prediction and one proba_<class> column per class (classification)."""
    return pd.DataFrame({"path": items.names, **state.prediction_columns(decoded)})


def _label_array(labels: pd.Series) -> np.ndarray:
    values = labels.tolist()
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([str(v) for v in values])  # a fixed-width unicode array: no pickle needed


def store_rows(items: ImageItems) -> bytes:
    buffer = io.BytesIO()
    arrays = {"images": items.images, "names": np.asarray(items.names)}
    if items.labels is not None:
        arrays["labels"] = _label_array(items.labels)
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_stored(path: Path) -> Iterator[ImageItems]:
    with np.load(path, allow_pickle=False) as archive:
        labels = pd.Series(archive["labels"].tolist(), name="label") if "labels" in archive.files else None
        items = ImageItems(archive["images"], archive["names"].tolist(), labels)
    for start in range(0, count(items), READ_IMAGES):
        end = start + READ_IMAGES
        yield ImageItems(
            items.images[start:end],
            items.names[start:end],
            None if labels is None else labels.iloc[start:end].reset_index(drop=True),
        )


def feeds(state: ImageState, items: ImageItems) -> dict[str, np.ndarray]:
    return {"images": np.ascontiguousarray(items.images.transpose(0, 3, 1, 2))}
