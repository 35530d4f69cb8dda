"""Image data: open the source, split it, fit the state (size, channels, pixel mean/std, classes) on the
training images, decode every image once into a uint8 tensor, and augment whole batches with tensor ops
(no per-sample PIL transforms in a DataLoader)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from danlu.config import DataConfig, ModelConfig, TrainConfig
from danlu.data.batches import Batch, TensorPart
from danlu.data.dataset import Dataset, HeldOut, assemble
from danlu.data.split import memory_budget, split_indices
from danlu.errors import DanluError
from danlu.families.image.cache import cache_key, mapped_items
from danlu.families.image.codec import ImageItems, decode_items, to_nchw
from danlu.families.image.decode import open_image
from danlu.families.image.reader import GRAY_MODES, Geometry, read_images
from danlu.families.image.sources import ImageSource, open_source
from danlu.families.image.state import ImageState
from danlu.families.target import TargetFitter

log = logging.getLogger("danlu")


def _configured_size(config: DataConfig) -> tuple[int, int] | None:
    size = config.image_size
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _shape_of(source: ImageSource, i: int, skip_bad: bool) -> tuple[int, int, str] | None:
    """(height, width, mode) of one image, reading only its header for files."""
    if source.arrays is not None:
        array = source.arrays[i]
        return array.shape[0], array.shape[1], "L" if array.ndim == 2 or array.shape[2] == 1 else "RGB"
    try:
        image = open_image(source.paths[i], f"'{source.paths[i]}'", load=False)  # the header only
    except DanluError:
        if skip_bad:
            return None
        raise
    return image.height, image.width, image.mode


def _channels(config: DataConfig, gray: bool) -> int:
    if config.color != "auto":
        return 1 if config.color == "grayscale" else 3
    return 1 if gray else 3


def _first_image(source: ImageSource, config: DataConfig) -> Geometry:
    """The geometry a pass over a new run's files starts from: the configured size or the first readable
    image's (which every other must then have), and its channels (data.color auto: one for a gray
    image, widened at the first colour image)."""
    for i in range(len(source)):
        shape = _shape_of(source, i, config.skip_bad_images)
        if shape is not None:
            configured = _configured_size(config)
            return Geometry(
                configured or shape[:2],
                _channels(config, shape[2] in GRAY_MODES),
                resize=configured is not None,
                widen=config.color == "auto",
                first=f"'{source.paths[i]}'",
            )
    raise DanluError(f"'{source.name}' has no readable images", "check the images")


def _decoded_bytes(n: int, geometry: Geometry) -> int:
    return n * geometry.size[0] * geometry.size[1] * geometry.channels


def _decode_fitting(
    source: ImageSource, split: Callable[[], list[np.ndarray]], config: DataConfig, geometry: Geometry
) -> tuple[list[np.ndarray], list[tuple[ImageItems, np.ndarray]]]:
    """A new run's images decoded in one pass over the files (reader.py), fitting the geometry on the
    way (`geometry` ends as the images were decoded); `split()` runs while the workers read. Returns
    the splits and each split's (items, kept positions)."""
    splits, decoded = read_images(source, split, geometry, config.skip_bad_images)
    parts = []
    for images, kept in decoded:
        labels = source.labels.iloc[kept].reset_index(drop=True)
        parts.append((ImageItems(images, source.names(kept), labels), kept))
    return splits, parts


def _fit_geometry(
    source: ImageSource, indices: np.ndarray, config: DataConfig
) -> tuple[tuple[int, int], int]:
    """The model's (height, width) and channels from the images and the config."""
    shapes = [s for s in (_shape_of(source, i, config.skip_bad_images) for i in indices) if s is not None]
    if not shapes:
        raise DanluError(f"'{source.name}' has no readable images", "check the images")
    size = _configured_size(config)
    if size is None:
        sizes = {(h, w) for h, w, _ in shapes}
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:4])
            raise DanluError(
                f"the images have {len(sizes)} different sizes ({shown}, ...)",
                "set data.image_size, e.g. data.image_size=64 or data.image_size=[48,64] (height, width)",
            )
        size = sizes.pop()
    return size, _channels(config, all(mode in GRAY_MODES for _, _, mode in shapes))


def _pixel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [n, h, w, c] in [0, 1], from each channel's histogram of
    the 256 pixel values (exact counts; no float copy of the images)."""
    c = images.shape[3]
    counts = np.zeros((c, 256), np.int64)
    for start in range(0, len(images), 4096):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + 4096])).reshape(-1, c)
        for channel in range(c):  # torch counts uint8 as it is (numpy would widen every pixel to int64)
            counts[channel] += torch.bincount(pixels[:, channel], minlength=256).numpy()
    values = np.arange(256) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ values / n
    std = np.sqrt(np.maximum(counts @ values**2 / n - mean**2, 0.0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def augmenter(kind: str, size: tuple[int, int]) -> Callable[[Batch, torch.Generator], Batch] | None:
    """light: random crops of the image padded by an eighth of its size (shifts); standard: also
    horizontal flips. Drawn from the epoch's generator, so a resumed run replays them exactly."""
    if kind == "none":
        return None
    pad = max(1, min(size) // 8)

    def augment(batch: Batch, generator: torch.Generator) -> Batch:
        images = batch.inputs["images"]
        n, _, h, w = images.shape
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        index = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[index, channel, rows, cols]
        if kind == "standard":
            flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
            out = torch.where(flip[:, None, None, None], out.flip(3), out)
        return Batch({"images": out}, batch.target)

    return augment


def _probe_parts(tower, state: ImageState, config: DataConfig, cache: Path | None, device):
    """part(items, source, split) for a linear probe: the items' tower features (unaugmented), computed
    once and kept under `cache` (RUN/cache), keyed by the source, the decoding and the tower's weights
    (each source's key taken once: its listing stats every file)."""
    from danlu.families.image import probe

    keys: dict[int, str] = {}

    def part(items: ImageItems, source: ImageSource, split: str) -> TensorPart:
        def key() -> str:
            if id(source) not in keys:
                keys[id(source)] = (
                    f"{cache_key(source, state, config.skip_bad_images)}-{state.tower['weights']}"
                )
            return keys[id(source)]

        def compute() -> np.ndarray:
            return probe.features(tower, items.images, state.mean, state.std, device)

        found = probe.cached_features(cache, key, split, compute)
        target = torch.from_numpy(state.encode_target(items.labels))
        return TensorPart(Batch({"features": torch.from_numpy(found)}, target)).to(device)

    return part


def _part(items: ImageItems, state: ImageState, device, augment=None) -> TensorPart:
    target = torch.from_numpy(state.encode_target(items.labels))
    if isinstance(items.images, np.memmap):  # over the memory budget: batches gathered from the map
        images = torch.from_numpy(items.images).permute(0, 3, 1, 2)  # a view: nothing is read yet
        return TensorPart(Batch({"images": images}, target), augment, device=device)
    return TensorPart(Batch({"images": to_nchw(items.images)}, target), augment).to(device)


def _separate(name: str, spec: str, config: DataConfig, state: ImageState, device, probe_part=None):
    source = open_source(spec, config.image, config.target)
    if source.labels is None:
        raise DanluError(f"'{spec}' has no labels", "give validation/test images their labels")
    items, kept = decode_items(source, np.arange(len(source)), state, config.skip_bad_images)
    part = probe_part(items, source, name) if probe_part else _part(items, state, device)
    return part, HeldOut(name, source, items, kept)


def _new_state(
    source: ImageSource,
    train_idx: np.ndarray,
    config: DataConfig,
    task: str,
    tower: dict | None,
    geometry: tuple[tuple[int, int], int] | None = None,
) -> ImageState:
    """Size, channels and classes (the pixel statistics follow once the training images are decoded).
    Every image of the source must agree on its size, or data.image_size says what to resize to: the
    geometry the decoding pass found, else a pass over the images' headers. A probe's images take its
    tower's size and its processor's mean and std."""
    fitter = TargetFitter(task, config.target or "label")
    fitter.update(source.labels.iloc[train_idx].reset_index(drop=True))
    if tower is not None:
        if config.image_size is not None:
            raise DanluError(
                f"a linear probe reads images at its tower's size ({tower['size'][1]}x{tower['size'][0]})",
                "leave out data.image_size",
            )
        return ImageState(
            *tower["size"], 3, tower["mean"], tower["std"], fitter.finish(), config.image, tower
        )
    size, channels = geometry or _fit_geometry(source, np.arange(len(source)), config)
    return ImageState(*size, channels, [0.0] * channels, [1.0] * channels, fitter.finish(), config.image)


def _decoder(source: ImageSource, state: ImageState, config: DataConfig, cache: Path | None):
    """decoded(split, indices) -> (items, kept): into memory, or into memory-mapped files under `cache`
    when the decoded source is over the memory budget."""
    needed = len(source) * state.height * state.width * state.channels
    if needed <= memory_budget(config):
        return lambda split, indices: decode_items(source, indices, state, config.skip_bad_images)
    if cache is None:
        raise DanluError(
            f"the decoded images take {needed / 2**30:.1f} GiB, over the memory budget",
            "raise data.memory_budget_gb, or lower data.image_size",
        )
    log.info(
        "decoded images (%.1f GiB) are over the memory budget: mapping them from %s", needed / 2**30, cache
    )
    key = cache_key(source, state, config.skip_bad_images)
    return lambda split, indices: mapped_items(
        cache, key, split, source, indices, state, config.skip_bad_images
    )


def load(
    config: DataConfig,
    device: torch.device,
    state: ImageState | None = None,
    cache: Path | None = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
) -> Dataset:
    """Split the source, fit the state on the training images (unless given), decode every image once:
    into memory, or, past the memory budget, into memory-mapped files under `cache` (RUN/cache)."""
    source = open_source(config.train, config.image, config.target)
    if source.labels is None:
        raise DanluError(
            f"'{config.train}' has no labels",
            "use one subfolder per class, a CSV with data.target, or IDX/NPZ files with labels",
        )
    task = "regression" if config.task == "regression" else "classification"
    labels = source.labels
    by_class = labels if task == "classification" else None

    def split() -> list[np.ndarray]:
        return list(split_indices(len(source), by_class, config))

    fitting = state is None
    tower = None
    if model is not None and model.pretrained is not None:  # a linear probe on a frozen image tower
        from danlu.families.image.probe import pretrained_tower

        tower, info = pretrained_tower(model.pretrained, state.tower if state is not None else None)
    files = fitting and tower is None and source.paths is not None
    geometry = _first_image(source, config) if files else None
    if geometry is not None and _decoded_bytes(len(source), geometry) <= memory_budget(config):
        splits, parts = _decode_fitting(source, split, config, geometry)
        train_idx, val_idx, test_idx = splits
        state = _new_state(source, train_idx, config, task, None, (geometry.size, geometry.channels))
        (train, train_kept), (val, val_kept), (test, test_kept) = parts
    else:
        splits = split()
        train_idx, val_idx, test_idx = splits
        if fitting:
            state = _new_state(source, train_idx, config, task, info if tower is not None else None)
        decoded = _decoder(source, state, config, cache)
        names = ("train", "validation", "test")
        (train, train_kept), (val, val_kept), (test, test_kept) = (
            decoded(name, indices) for name, indices in zip(names, splits, strict=True)
        )
    if not len(train_kept):
        raise DanluError(f"'{config.train}' has no readable training images", "check the images")
    if fitting and tower is None:
        state.mean, state.std = _pixel_stats(train.images)
    skipped = len(train_idx) - len(train_kept)
    skipped += len(val_idx) - len(val_kept) + len(test_idx) - len(test_kept)
    if skipped:
        log.warning("skipped %d unreadable images (data.skip_bad_images)", skipped)

    decoded_splits = {"validation": (val, val_kept), "test": (test, test_kept)}
    # a probe: the tower runs once per image and the head trains on its features
    probe_part = _probe_parts(tower, state, config, cache, device) if tower is not None else None

    def own(name: str):
        items, kept = decoded_splits[name]
        if not len(kept):
            return None, None
        part = probe_part(items, source, name) if probe_part else _part(items, state, device)
        return part, HeldOut(name, source, items, kept)

    def sample(rows: int) -> HeldOut:
        items = ImageItems(train.images[:rows], train.names[:rows], train.labels.iloc[:rows])
        return HeldOut("none", source, items, train_kept[:rows])

    if probe_part is not None:
        train_part = probe_part(train, source, "train")
    else:
        train_part = _part(train, state, device, augmenter(config.augment, state.size))
    return assemble(
        config,
        state,
        train_part,
        source,
        own,
        lambda name, spec: _separate(name, spec, config, state, device, probe_part),
        sample,
    )
