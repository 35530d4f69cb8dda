"""One pass over the image files of a source: each file read once, its bytes hashed for the source's
fingerprint, its header checked and its pixels decoded to the model's size and channels.

Files are read in chunks of CHUNK, by worker processes (forked, one per core) when the source has at
least PARALLEL_FILES of them, else in this process; results are assembled in order, so the arrays are
the same either way. While fitting (a new run with data.color auto) a chunk decodes to one channel until
it meets a colour image; it stops there, and the pass widens what it has to three channels (the gray
images repeated, as Pillow converts them; gray modes other than L and 1 decoded again) and goes on in
three."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from danlu.errors import DanluError
from danlu.families.image.decode import decode_opened, from_pil, open_image
from danlu.families.image.sources import ImageSource, read_with_stat

CHUNK = 512
PARALLEL_FILES = 4096  # fewer files are read in this process: starting workers would cost more
GRAY_MODES = ("L", "1", "I", "I;16", "F")
PLAIN_GRAY = ("L", "1")  # gray modes whose RGB conversion repeats their one channel


@dataclass
class Geometry:
    """What the images are decoded to: size (height, width) and channels. resize: images of another
    size are resized (else they are an error: a new run without data.image_size); widen: the channels
    go from one to three at the first colour image (data.color auto while fitting)."""

    size: tuple[int, int]
    channels: int
    resize: bool = True
    widen: bool = False
    first: str = ""  # the image the size was taken from, for the error naming another


@dataclass
class _Task:
    indices: np.ndarray  # positions in the source, increasing
    paths: list[str]
    size: tuple[int, int]
    channels: int
    resize: bool
    widen: bool
    skip_bad: bool


@dataclass
class _Chunk:
    task: _Task
    images: np.ndarray  # [len(kept), h, w, channels of the task]
    kept: np.ndarray  # positions in the task's indices
    digests: np.ndarray  # [read, 32]: SHA-256 of each file read
    stats: np.ndarray  # [read, 2]: its size and modification time (ns)
    regray: list[int] = field(default_factory=list)  # rows of gray images other than L or 1
    stop: int | None = None  # position of the first colour image when decoding to one channel
    error: tuple[str, str | None] | None = None  # (problem, fix) of a bad file that ends the pass
    other_size: tuple[str, int, int] | None = None  # (name, height, width) of an image of another size


def _read_chunk(task: _Task) -> _Chunk:
    """Read, hash and decode the task's files (in a worker or in this process)."""
    import hashlib

    images = np.empty((len(task.paths), *task.size, task.channels), np.uint8)
    digests: list[bytes] = []
    stats: list[tuple[int, int]] = []
    kept: list[int] = []
    nothing = np.empty(0, np.int64)
    chunk = _Chunk(task, images, nothing, nothing.reshape(0, 32).astype(np.uint8), nothing.reshape(0, 2))
    for k, path in enumerate(task.paths):
        name = f"'{path}'"
        try:
            try:
                data, stat = read_with_stat(path)
            except DanluError:  # noted as unreadable: no bytes, size and time -1
                digests.append(bytes(32))
                stats.append((-1, -1))
                raise
            digests.append(hashlib.sha256(data).digest())
            stats.append((stat.st_size, stat.st_mtime_ns))
            image = open_image(data, name)  # header and pixels
            if not task.resize and (image.height, image.width) != task.size:
                chunk.other_size = (name, image.height, image.width)
                break
            if task.widen and task.channels == 1 and image.mode not in GRAY_MODES:
                chunk.stop = k
                break
        except DanluError as exc:
            if task.skip_bad:
                continue
            chunk.error = (exc.message, exc.hint)
            break
        images[len(kept)] = from_pil(image, task.size, task.channels)
        if task.widen and task.channels == 1 and image.mode not in PLAIN_GRAY:
            chunk.regray.append(len(kept))
        kept.append(k)
    chunk.images, chunk.kept = images[: len(kept)], np.asarray(kept, dtype=np.int64)
    chunk.digests = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32)
    chunk.stats = np.asarray(stats, dtype=np.int64).reshape(-1, 2)
    return chunk


def _workers(files: int) -> int:
    if files < PARALLEL_FILES or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 8))


@contextlib.contextmanager
def _chunks(tasks: list[_Task]) -> Iterator[Iterator[_Chunk]]:
    """The tasks' chunks in order. With workers, every task is handed out on entering, so they read
    while this process does other work (the split) before it takes the first chunk; otherwise (one
    core, few files) they are read here as they are taken."""
    workers = _workers(sum(len(t.paths) for t in tasks))
    if workers == 1:
        yield map(_read_chunk, tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield _guarded(pool.map(_read_chunk, tasks), tasks)
    finally:
        pool.shutdown(cancel_futures=True)


def _guarded(chunks: Iterator[_Chunk], tasks: list[_Task]) -> Iterator[_Chunk]:
    """A pool's chunks; if it breaks (a worker killed), the rest read here."""
    done = 0
    try:
        for chunk in chunks:
            done += 1
            yield chunk
    except BrokenProcessPool:
        yield from map(_read_chunk, tasks[done:])


class _Pass:
    """Where each decoded image goes: its split's array, at the next row of that split (each split's
    positions increase and chunks come in source order, so rows fill in the split's order)."""

    def __init__(self, source: ImageSource, geometry: Geometry, splits: list[np.ndarray], outs):
        self.source, self.geometry = source, geometry
        self.arrays = [
            out if out is not None else np.empty((len(ix), *geometry.size, geometry.channels), np.uint8)
            for ix, out in zip(splits, outs, strict=True)
        ]
        self.owner = np.full(len(source), -1, np.int8)  # each position's split
        for s, ix in enumerate(splits):
            self.owner[ix] = s
        self.filled = [0] * len(splits)
        self.kept: list[list[np.ndarray]] = [[] for _ in splits]
        self.regray: list[tuple[int, int, int]] = []  # (split, row, source position)

    def widen(self) -> None:
        """From one channel to three: every array so far repeated, the other gray modes decoded again."""
        self.geometry.channels = 3
        self.arrays = [np.repeat(a, 3, axis=3) for a in self.arrays]
        for split, row, i in self.regray:
            self.arrays[split][row] = self._decoded(i, 3)
        self.regray = []

    def _decoded(self, i: int, channels: int) -> np.ndarray:
        name = f"'{self.source.paths[i]}'"
        return decode_opened(
            open_image(self.source.read_file(i), name, load=False), self.geometry.size, channels, name
        )

    def _raise(self, chunk: _Chunk) -> None:
        if chunk.error is not None:
            raise DanluError(*chunk.error)
        if chunk.other_size is not None:
            name, height, width = chunk.other_size
            size = self.geometry.size
            raise DanluError(
                f"the images have different sizes: {name} is {width}x{height}, {self.geometry.first} is "
                f"{size[1]}x{size[0]}",
                "set data.image_size, e.g. data.image_size=64 or data.image_size=[48,64] (height, width)",
            )

    def take(self, chunk: _Chunk) -> None:
        task = chunk.task
        self.source.note(task.indices[: len(chunk.digests)], chunk.digests, chunk.stats)
        self._raise(chunk)
        images, positions = chunk.images, task.indices[chunk.kept]
        regray = set(chunk.regray)
        if images.shape[3] < self.geometry.channels:  # read before a colour image widened the pass
            images = np.repeat(images, 3, axis=3)
            for row in regray:
                images[row] = self._decoded(positions[row], 3)
            regray = set()
        owners = self.owner[positions]
        for s in np.unique(owners):
            rows = np.flatnonzero(owners == s)
            at = self.filled[s]
            self.arrays[s][at : at + len(rows)] = images[rows]
            self.regray += [(s, at + k, positions[r]) for k, r in enumerate(rows) if r in regray]
            self.filled[s] += len(rows)
            self.kept[s].append(positions[rows])
        if chunk.stop is not None:  # a colour image: three channels from here on
            if self.geometry.channels == 1:
                self.widen()
            rest = dataclasses.replace(
                task, channels=3, indices=task.indices[chunk.stop :], paths=task.paths[chunk.stop :]
            )
            self.take(_read_chunk(rest))


def read_images(
    source: ImageSource,
    splits: list[np.ndarray] | Callable[[], list[np.ndarray]],
    geometry: Geometry,
    skip_bad: bool,
    outs: list[np.ndarray | None] | None = None,
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The images of each split of a source of files, decoded in one pass in the source's order.

    splits: each split's positions in the source, increasing; or a function giving them, for splits of
    the whole source, called once the workers are reading (the split's time then overlaps theirs).
    Returns the splits and per split (images [kept, h, w, channels], kept positions).
    `geometry.channels` ends as decoded. outs: arrays to decode into (memory-mapped caches; no
    widening), else new arrays."""
    if callable(splits):
        order = np.arange(len(source))
    else:
        if any(len(ix) > 1 and not np.all(np.diff(ix) > 0) for ix in splits):
            raise ValueError("the positions of a split must increase")
        order = np.unique(np.concatenate(splits)) if splits else np.empty(0, np.int64)
    g = geometry
    tasks = [
        _Task(ix, [source.paths[i] for i in ix], g.size, g.channels, g.resize, g.widen, skip_bad)
        for start in range(0, len(order), CHUNK)
        if len(ix := order[start : start + CHUNK])
    ]
    with _chunks(tasks) as chunks:
        splits = splits() if callable(splits) else splits
        outs = outs or [None] * len(splits)
        if geometry.widen and any(out is not None for out in outs):
            raise ValueError("a pass into given arrays cannot widen them")
        state = _Pass(source, geometry, splits, outs)
        for chunk in chunks:
            state.take(chunk)
    return splits, [
        (array[:filled], np.concatenate(kept) if kept else np.empty(0, np.int64))
        for array, filled, kept in zip(state.arrays, state.filled, state.kept, strict=True)
    ]
