"""Image sources: a folder per class (ImageFolder), a CSV/Parquet with a path column, MNIST-format IDX
files, or NPZ arrays. Each is a list of images (decoded on demand, to a size) with labels when known."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd

from danlu.data.sources import file_fingerprint
from danlu.errors import DanluError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IDX_MARK = "idx3-ubyte"


def is_idx(path: Path) -> bool:
    return IDX_MARK in path.name


def _open_idx(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DanluError(f"cannot read '{path}': {exc}", "check the IDX file (MNIST format)") from None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): uint8 images [n, h, w] or labels [n]."""
    data = _open_idx(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DanluError(f"'{path}' is not an unsigned-byte IDX file", "pass MNIST-format idx files")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DanluError(f"'{path}' is truncated: {body.size} bytes for shape {shape}", "download it again")
    return body.reshape(shape)


def idx_labels_path(images: Path) -> Path:
    name = images.name.replace("images-idx3-ubyte", "labels-idx1-ubyte")
    return images.with_name(name)


class ImageSource:
    """Images and (when known) labels of one source. `arrays` holds decoded images for IDX/NPZ; `paths`
    the files of a folder or CSV, decoded when `read` asks for them."""

    def __init__(
        self,
        name: str,
        labels: pd.Series | None,
        paths: list[Path] | None = None,
        arrays: np.ndarray | None = None,
        files: list[Path] | None = None,
    ):
        self.name = name
        self.labels = labels
        self.paths = paths
        self.arrays = arrays  # uint8 [n, h, w] or [n, h, w, c]
        self.files = files or []  # what the fingerprint covers

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.arrays)

    def names(self, indices: np.ndarray) -> list[str]:
        if self.paths is not None:
            return [str(self.paths[i]) for i in indices]
        return [f"{self.name}#{i}" for i in indices]

    def fingerprint(self) -> dict:
        if self.arrays is not None and len(self.files) <= 2:
            return {str(Path(f).name): file_fingerprint(f) for f in self.files}
        digest = hashlib.sha256()
        total = 0
        for path in self.files:  # every image file: its place and its bytes
            data = path.read_bytes()
            total += len(data)
            digest.update(os.fsencode(str(path)) + b"\0" + hashlib.sha256(data).digest())
        return {"files": len(self.files), "bytes": total, "sha256": digest.hexdigest()}


def _folder(path: Path) -> ImageSource:
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for folder in classes:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                files.append(file)
                labels.append(folder.name)
    if not classes:  # a flat folder of images: unlabelled (for predict)
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DanluError(f"'{path}' holds no images", f"put {', '.join(IMAGE_SUFFIXES[:4])} files in it")
        return ImageSource(str(path), None, paths=files, files=files)
    if not files:
        raise DanluError(
            f"'{path}' has class folders but no images in them",
            f"put images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in {classes[0]}/ and the other class folders",
        )
    return ImageSource(str(path), pd.Series(labels, name="label"), paths=files, files=files)


def _table(path: Path, image_column: str | None, target: str | None) -> ImageSource:
    from danlu.data.sources import open_table

    frame = open_table(str(path)).read_all()
    if image_column is None or image_column not in frame.columns:
        raise DanluError(
            f"'{path}' has no image-path column '{image_column}'",
            f"name it with data.image=COLUMN; columns: {', '.join(map(str, frame.columns[:20]))}",
        )
    paths = [(path.parent / str(p)).resolve() for p in frame[image_column]]
    labels = None
    if target is not None:
        if target not in frame.columns:
            raise DanluError(f"'{path}' has no target column '{target}'", "check data.target")
        labels = frame[target].reset_index(drop=True)
    return ImageSource(str(path), labels, paths=paths, files=[path, *paths])


def _npz(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DanluError(f"'{path}' has no 'images' member", "save images=[N,H,W(,C)] and labels=[N]")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except (ValueError, OSError) as exc:
        raise DanluError(f"cannot read '{path}' as NPZ: {exc}", "check the file") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DanluError(
            f"'{path}' images are {images.dtype} {images.shape}", "store uint8 images as [N,H,W] or [N,H,W,C]"
        )
    series = None if labels is None else pd.Series(labels.tolist(), name="label")
    return ImageSource(str(path), series, arrays=images, files=[path])


def _idx(path: Path) -> ImageSource:
    images = read_idx(path)
    if images.ndim != 3:
        raise DanluError(f"'{path}' holds {images.ndim}-D data, not images", "pass the images file")
    labels_path = idx_labels_path(path)
    labels = None
    files = [path]
    if labels_path.is_file():
        labels = pd.Series(read_idx(labels_path).astype(np.int64).tolist(), name="label")
        files.append(labels_path)
        if len(labels) != len(images):
            raise DanluError(
                f"'{labels_path}' has {len(labels)} labels for {len(images)} images", "pair them"
            )
    return ImageSource(str(path), labels, arrays=images, files=files)


def open_source(spec: str, image_column: str | None = None, target: str | None = None) -> ImageSource:
    """Open an image source by its config string (a folder, a CSV/Parquet of paths, IDX or NPZ)."""
    path = Path(spec)
    if not path.exists():
        raise DanluError(
            f"image data '{spec}' not found", "check the path in the config or on the command line"
        )
    if path.is_dir():
        return _folder(path)
    if is_idx(path):
        return _idx(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix in (".csv", ".parquet", ".pq"):
        return _table(path, image_column, target)
    if suffix in IMAGE_SUFFIXES:
        return ImageSource(str(path), None, paths=[path], files=[path])
    raise DanluError(
        f"'{spec}' is not an image source",
        "pass a folder (one subfolder per class), a CSV/Parquet with data.image, IDX or NPZ (images, labels)",
    )


def looks_like_images(spec: str) -> bool:
    """For data.family: auto: a folder, an IDX file, a single image, or an NPZ with an `images` member."""
    if spec.startswith("synthetic:"):
        return False
    path = Path(spec)
    if path.is_dir() or is_idx(path) or path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return "images" in archive.files
        except (ValueError, OSError):
            return False
    return False
