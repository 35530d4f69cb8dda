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

from danlu.config import existing_data
from danlu.data.dataset import Fingerprinted
from danlu.data.sources import NUMPY_FILE_ERRORS, PARQUET, file_fingerprint
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


class FileNames:
    """File paths (root/name, as strings) kept as one UTF-8 blob and an array of offsets rather than a
    Python object per file: 60,000 names take about 2 MB, not 30."""

    def __init__(self, root: str, names: list[str]):
        encoded = [os.fsencode(name) for name in names]
        root = "" if root == "." else root  # as Path(".", name) is name
        self.root = root + "/" if root and not root.endswith("/") else root
        self._blob = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def blob(self) -> bytes:
        """Every name and where it ends: the list's content in bytes."""
        return os.fsencode(self.root) + b"\0" + self._blob + self._ends.astype("<i8").tobytes()

    def name(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._blob[start : int(self._ends[i])])

    def __getitem__(self, i: int) -> str:
        return self.root + self.name(i)


def _parts(name: str) -> list[str]:
    return name.split("/")


def list_images(root: Path, recursive: bool = True) -> list[str]:
    """The image files under root as names relative to it ("a/b.png"), in path order (component by
    component, as sorted Path objects), listed with os.scandir: no Path object per file."""
    names: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir() and recursive:
                    walk(entry.path, f"{prefix}{entry.name}/")
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    names.append(prefix + entry.name)

    walk(str(root), "")
    nested = any("/" in name for name in names)
    return sorted(names, key=_parts) if nested else sorted(names)  # one level: the same order


def read_with_stat(path: str) -> tuple[bytes, os.stat_result]:
    """A file's bytes and its stat as it was read, with three system calls (no file object: this runs
    once per image); DanluError naming the file when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            parts = [os.read(fd, stat.st_size + 1)]
            while len(parts[-1]) and sum(map(len, parts)) > stat.st_size:  # it grew: read to its end
                parts.append(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    except OSError as exc:
        raise DanluError(f"'{path}' cannot be read ({exc.strerror})", "check or remove it") from None
    return (b"".join(parts) if len(parts) > 1 else parts[0]), stat


def _stat(path) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:  # gone: a listing that matches nothing (reading it names the file)
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


class ImageSource(Fingerprinted):
    """Images and (when known) labels of one source. `arrays` holds decoded images for IDX/NPZ; `paths`
    the files of a folder or CSV, decoded when `read` asks for them.

    The fingerprint of files has two parts: a listing (each file's path, size and modification time,
    cheap to take again) and a content hash (each file's bytes, taken as the decoding pass reads them, or
    read on demand). `matches` compares the listing first and reads the files only when it differs."""

    def __init__(
        self,
        name: str,
        labels: pd.Series | None,
        paths: FileNames | None = None,
        arrays: np.ndarray | None = None,
        files: list[Path] | None = None,
    ):
        self.name = name
        self.labels = labels
        self.paths = paths
        self.arrays = arrays  # uint8 [n, h, w] or [n, h, w, c]
        self.files = files or []  # IDX/NPZ: the data files; for paths: files besides them (a CSV)
        n = 0 if paths is None else len(paths)
        self._digests = np.zeros((n, 32), np.uint8)  # of each file's bytes, as they were read
        self._stats = np.zeros((n, 2), np.int64)  # its size and modification time (ns) then
        self._hashed = np.zeros(n, bool)

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.arrays)

    def names(self, indices: np.ndarray) -> list[str]:
        if self.paths is not None:
            return [self.paths[i] for i in indices]
        return [f"{self.name}#{i}" for i in indices]

    def read_file(self, i: int) -> bytes:
        """The bytes of image file i, its hash noted for the fingerprint (read once, not again)."""
        data, stat = read_with_stat(self.paths[i])
        digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
        self.note(np.array([i]), digest[None], np.array([[stat.st_size, stat.st_mtime_ns]]))
        return data

    def note(self, indices: np.ndarray, digests: np.ndarray, stats: np.ndarray) -> None:
        """Files read elsewhere (the decoding pass): the SHA-256 of their bytes [n, 32] and their size
        and modification time when read [n, 2]."""
        self._digests[indices] = digests
        self._stats[indices] = stats
        self._hashed[indices] = True

    def listing(self) -> dict:
        """Files, bytes and a hash of every file's path, size and modification time (as read by this
        source where it was read, else from the file system; -1 for a file that is gone)."""
        digest = hashlib.sha256()
        stats = [_stat(path) for path in self.files]
        for path in self.files:
            digest.update(os.fsencode(str(path)) + b"\0")
        table = np.asarray(stats, dtype="<i8").reshape(-1, 2)
        if self.paths is not None:
            found = self._stats.copy()
            for i in np.flatnonzero(~self._hashed):
                found[i] = _stat(self.paths[i])
            digest.update(self.paths.blob())
            table = np.concatenate([table, found])
        digest.update(table.tobytes())
        return {"files": len(table), "bytes": int(table[:, 0].clip(0).sum()), "listing": digest.hexdigest()}

    def _content(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(os.fsencode(str(path)) + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
        if self.paths is not None:
            for i in range(len(self.paths)):
                if not self._hashed[i]:
                    self.read_file(i)
                digest.update(os.fsencode(str(self.paths[i])) + b"\0" + self._digests[i].tobytes())
        return digest.hexdigest()

    def fingerprint(self, content: bool = True) -> dict:
        """The listing and (with content) the hash of every file's place and bytes."""
        if self.paths is None:  # IDX or NPZ: one or two data files
            return {str(Path(f).name): file_fingerprint(f) for f in self.files}
        found = self.listing()
        return {**found, "sha256": self._content()} if content else found

    def matches(self, expected: dict) -> bool:
        """Whether this is the content `expected` (a fingerprint) was taken of: the same listing, or,
        when the listing differs (files copied or touched), the same bytes."""
        if self.paths is None:
            return self.fingerprint() == expected
        listing = self.listing()
        if "listing" in expected and listing == {k: expected.get(k) for k in listing}:
            return True
        found = {**listing, "sha256": self._content()}
        return all(found[k] == expected.get(k) for k in ("files", "bytes", "sha256"))


def _folder(path: Path) -> ImageSource:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:  # a flat folder of images: unlabelled (for predict)
        names = list_images(path, recursive=False)
        if not names:
            raise DanluError(f"'{path}' holds no images", f"put {', '.join(IMAGE_SUFFIXES[:4])} files in it")
        return ImageSource(str(path), None, paths=FileNames(str(path), names))
    names, labels = [], []
    for label in classes:  # one str per class, shared by its files
        found = list_images(path / label)
        names += [f"{label}/{name}" for name in found]
        labels += [label] * len(found)
    if not names:
        raise DanluError(
            f"'{path}' has class folders but no images in them",
            f"put images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in {classes[0]}/ and the other class folders",
        )
    return ImageSource(str(path), pd.Series(labels, name="label"), paths=FileNames(str(path), names))


def table_path(table: Path, written: str) -> Path:
    """An image path as a table holds it, relative to the table's folder. One written on Windows
    (data\\cat\\1.png) is read with / where that is the file and the path as written is none."""
    path = table.parent / written
    if os.sep == "/" and "\\" in written and not path.exists():
        slashed = table.parent / written.replace("\\", "/")
        if slashed.exists():
            return slashed
    return path


def _table(path: Path, image_column: str | None, target: str | None) -> ImageSource:
    from danlu.data.sources import open_table

    frame = open_table(str(path)).read_all()
    if image_column is None or image_column not in frame.columns:
        raise DanluError(
            f"'{path}' has no image-path column '{image_column}'",
            f"name it with data.image=COLUMN; columns: {', '.join(map(str, frame.columns[:20]))}",
        )
    paths = FileNames("", [str(table_path(path, str(p)).resolve()) for p in frame[image_column]])
    labels = None
    if target is not None:
        if target not in frame.columns:
            raise DanluError(f"'{path}' has no target column '{target}'", "check data.target")
        labels = frame[target].reset_index(drop=True)
    return ImageSource(str(path), labels, paths=paths, files=[path])


def _npz(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DanluError(f"'{path}' has no 'images' member", "save images=[N,H,W(,C)] and labels=[N]")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except NUMPY_FILE_ERRORS as exc:
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
    path = existing_data(spec, "image data")
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
        return ImageSource(str(path), None, paths=FileNames("", [str(path)]))
    raise DanluError(
        f"'{spec}' is not an image source",
        "pass a folder (one subfolder per class), a CSV/Parquet with data.image, IDX or NPZ (images, labels)",
    )


def looks_like_images(spec: str) -> bool:
    """For data.family: auto: a folder, an IDX file, a single image, or an NPZ with an `images` member."""
    if spec.startswith("synthetic:"):
        return False
    path = Path(spec)
    if path.is_dir():  # images, unless it holds Parquet shards (a table)
        return not any(p.suffix.lower() in PARQUET for p in path.iterdir())
    if is_idx(path) or path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return "images" in archive.files
        except NUMPY_FILE_ERRORS:
            return False
    return False
