"""The image family: folders of images (one subfolder per class), CSV/Parquet with a path column,
MNIST-format IDX and NPZ arrays; a CNN, a small ResNet or the user's own module, on uint8 pixels
decoded once. See danlu.families for what each hook does."""

from __future__ import annotations

from danlu.config import DataConfig
from danlu.families.image.codec import (
    ImageItems,
    as_items,
    count,
    feeds,
    inputs,
    output_frame,
    read,
    read_stored,
    store_rows,
    targets,
)
from danlu.families.image.codec import decode_items as _decode_items
from danlu.families.image.data import load
from danlu.families.image.export import ImageExport as exporter
from danlu.families.image.models import build_model
from danlu.families.image.plots import image_grid, misclassified
from danlu.families.image.serve import (
    description,
    form_items,
    page_schema,
    request_items,
    request_model,
    warmup_items,
)
from danlu.families.image.sources import looks_like_images, open_source
from danlu.families.image.state import ImageState
from danlu.run import HELDOUT_IMAGES

NAME = "image"
MODEL_DEFAULTS = {"type": "cnn"}
# Time to accuracy on small images (benchmarks/train_images.py): one-cycle AdamW at 3e-3, batch 64, bf16
# autocast where the device supports it, to the end of the schedule (no early stopping).
TRAIN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 3e-3,
    "schedule": "onecycle",
    "patience": 0,
    "precision": "auto",
}
STORED_ROWS = HELDOUT_IMAGES
PREDICT_BATCH = 256
EVAL_BATCH = 512


def report_plots(run, model, part, state: ImageState, device) -> None:
    """plots/misclassified.png: held-out images the model gets wrong, with true and predicted labels."""
    if state.task == "classification":
        misclassified(model, part, state, device, run.plots / "misclassified.png")


def plot_predictions(state: ImageState, items: ImageItems, decoded, path) -> None:
    """`danlu predict --plot`: the images with their predicted labels (and probability)."""
    if state.task == "classification":
        labels = state.labels(decoded.argmax(axis=1))
        captions = [f"{label} ({p:.2f})" for label, p in zip(labels, decoded.max(axis=1), strict=True)]
    else:
        captions = [f"{value:.3g}" for value in decoded]
    image_grid(items.images, captions, path, "predictions")


def detect(data: DataConfig) -> bool:
    return data.image is not None or looks_like_images(data.train)


def state_from_json(text: str) -> ImageState:
    return ImageState.from_json(text)


def select(source, indices, state: ImageState) -> ImageItems:
    return _decode_items(source, indices, state)[0]


def reopen(spec: str, data: DataConfig, chunk_rows: int):
    return open_source(spec, data.image, data.target)


__all__ = [
    "EVAL_BATCH",
    "MODEL_DEFAULTS",
    "NAME",
    "PREDICT_BATCH",
    "STORED_ROWS",
    "TRAIN_DEFAULTS",
    "ImageItems",
    "as_items",
    "build_model",
    "count",
    "description",
    "detect",
    "exporter",
    "feeds",
    "form_items",
    "inputs",
    "load",
    "output_frame",
    "page_schema",
    "plot_predictions",
    "read",
    "read_stored",
    "reopen",
    "report_plots",
    "request_items",
    "request_model",
    "select",
    "state_from_json",
    "store_rows",
    "targets",
    "warmup_items",
]
