"""Tiny image data sets the tests write themselves: three shapes (a horizontal bar, a vertical bar, a
diagonal) drawn with noise, as an ImageFolder of PNGs, MNIST-format IDX files, NPZ, or a CSV of paths."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ("bar", "column", "diagonal")


def shapes(n: int, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, size, size] and labels 0..2, the shape drawn at a random offset."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    labels = np.arange(n) % 3
    for i, label in enumerate(labels):
        k = rng.integers(2, size - 2)
        if label == 0:
            images[i, k - 1 : k + 1, 1:-1] = 230
        elif label == 1:
            images[i, 1:-1, k - 1 : k + 1] = 230
        else:
            idx = np.arange(1, size - 1)
            images[i, idx, idx] = 230
            images[i, idx[:-1], idx[:-1] + 1] = 230
    return images, labels


def image_folder(root: Path, n: int = 90, size: int = 12, seed: int = 0, rgb: bool = False) -> Path:
    from PIL import Image

    images, labels = shapes(n, size, seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        (picture.convert("RGB") if rgb else picture).save(folder / f"{i:04d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def idx_files(root: Path, n: int = 90, size: int = 12, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images, labels = shapes(n, size, seed)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return write_idx(root / "train-images-idx3-ubyte.gz", images)


def npz_file(path: Path, n: int = 90, size: int = 12, seed: int = 0) -> Path:
    images, labels = shapes(n, size, seed)
    np.savez(path, images=images, labels=labels)
    return path


def csv_of_paths(root: Path, n: int = 90, size: int = 12, seed: int = 0) -> Path:
    folder = image_folder(root / "pictures", n, size, seed)
    rows = [{"file": str(p.relative_to(root)), "shape": p.parent.name} for p in sorted(folder.rglob("*.png"))]
    pd.DataFrame(rows).to_csv(root / "images.csv", index=False)
    return root / "images.csv"
