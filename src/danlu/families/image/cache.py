"""The decoded-image cache for image sets larger than the memory budget: each split decoded once into a
memory-mapped uint8 .npy under RUN/cache/, keyed by the source's listing and the decoding settings,
so a resumed run maps it again instead of decoding. Safe to delete; never packaged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from danlu import __version__
from danlu.families.image.codec import ImageItems, decode_items
from danlu.families.image.sources import ImageSource
from danlu.families.image.state import ImageState
from danlu.run import atomic_write_json


def cache_key(source: ImageSource, state: ImageState, skip_bad: bool) -> str:
    """The source's listing (paths, sizes, modification times: no file read) and the decoding."""
    listing = source.fingerprint(content=False)
    settings = [listing, state.height, state.width, state.channels, skip_bad, __version__]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def mapped_items(
    directory: Path, key: str, split: str, source: ImageSource, indices: np.ndarray, state: ImageState,
    skip_bad: bool,
) -> tuple[ImageItems, np.ndarray]:  # fmt: skip
    """The split's images decoded into (or mapped again from) directory/images-KEY-SPLIT.npy."""
    directory.mkdir(parents=True, exist_ok=True)
    path, done = directory / f"images-{key}-{split}.npy", directory / f"images-{key}-{split}.json"
    if done.is_file():  # written last: the array beside it is whole
        kept = np.asarray(json.loads(done.read_text())["kept"], dtype=np.int64)
        images = np.load(path, mmap_mode="c")  # copy-on-write: torch wants a writable array
        labels = None if source.labels is None else source.labels.iloc[kept].reset_index(drop=True)
        return ImageItems(images[: len(kept)], source.names(kept), labels), kept
    shape = (len(indices), state.height, state.width, state.channels)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    items, kept = decode_items(source, indices, state, skip_bad, out=array)
    array.flush()
    atomic_write_json(done, {"kept": kept.tolist(), "source": source.name})
    return items, kept
