"""The image family: folders of images (one subfolder per class), CSV/Parquet with a path column,
MNIST-format IDX and NPZ arrays; a CNN, a small ResNet or the user's own module, on uint8 pixels
decoded once."""

from __future__ import annotations

from pathlib import Path

from danlu.config import DataConfig, ModelConfig
from danlu.families.contract import Family
from danlu.families.image import codec, serve
from danlu.families.image.codec import ImageItems, decode_items
from danlu.families.image.data import load
from danlu.families.image.export import ImageExport
from danlu.families.image.models import MODELS, build_model
from danlu.families.image.plots import EVAL_BATCH, image_grid, misclassified
from danlu.families.image.sources import looks_like_images, open_source
from danlu.families.image.state import ImageState
from danlu.run import HELDOUT_IMAGES

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


def report_plots(run, model, part, state: ImageState, device) -> None:
    """plots/misclassified.png: held-out images the model gets wrong, with true and predicted labels (a
    probe's held-out part holds features, not images: no plot)."""
    if state.task == "classification" and state.tower is None:
        misclassified(model, part, state, device, run.plots / "misclassified.png")


def held_out_stats(state: ImageState, part) -> dict:
    """A probe's baseline: the image-text model's own zero-shot accuracy on the same held-out images."""
    if state.tower is None or state.task != "classification":
        return {}
    from danlu.families.image.probe import zero_shot_accuracy

    data = part.data
    features, target = data.inputs["features"].float().cpu().numpy(), data.target.cpu().numpy()
    return zero_shot_accuracy(state.tower["path"], state.classes, features, target)


def bind(state: ImageState, run_dir: Path) -> None:
    """A finished probe rebuilds its tower from preprocess.json, not model.pretrained."""
    state.run_dir = Path(run_dir)


def plot_predictions(state: ImageState, items: ImageItems, decoded, path) -> None:
    """`danlu predict --plot`: the images with their predicted labels (and probability)."""
    if state.task == "classification":
        labels = state.labels(decoded.argmax(axis=1))
        captions = [f"{label} ({p:.2f})" for label, p in zip(labels, decoded.max(axis=1), strict=True)]
    else:
        captions = [f"{value:.3g}" for value in decoded]
    image_grid(items.images, captions, path, "predictions")


def detect(data: DataConfig, model: ModelConfig) -> bool:
    return data.image is not None or looks_like_images(data.train)


def select(source, indices, state: ImageState) -> ImageItems:
    return decode_items(source, indices, state)[0]


def reopen(spec: str, data: DataConfig, chunk_rows: int):
    return open_source(spec, data.image, data.target)


FAMILY = Family(
    name="image",
    state_type=ImageState,
    detect=detect,
    model_types=tuple(MODELS),
    model_defaults={"type": "cnn"},
    train_defaults=TRAIN_DEFAULTS,
    load=load,
    build_model=build_model,
    read=codec.read,
    as_items=codec.as_items,
    inputs=codec.inputs,
    targets=codec.targets,
    count=codec.count,
    output_frame=codec.output_frame,
    stored_rows=HELDOUT_IMAGES,
    store_rows=codec.store_rows,
    read_stored=codec.read_stored,
    nbytes=codec.nbytes,
    select=select,
    reopen=reopen,
    exporter=ImageExport,
    request_model=serve.request_model,
    request_items=serve.request_items,
    form_items=serve.form_items,  # multipart uploads
    heavy_requests=True,
    warmup_items=serve.warmup_items,
    metadata=serve.metadata,
    page_form=serve.page_form,
    description=serve.description,
    skips_unreadable=True,
    predict_batch=256,
    eval_batch=EVAL_BATCH,
    report_plots=report_plots,
    held_out_stats=held_out_stats,
    plot_predictions=plot_predictions,
    bind=bind,
    checkpoint_trainable_only=lambda model: model.pretrained is not None,  # probes: the head alone
)
