"""Image folders at scale: one pass that reads each file once (hashed, checked, decoded), in forked
workers or in this process with the same arrays, compact per-file bookkeeping, and a fingerprint whose
recheck reads no file while the listing (paths, sizes, modification times) is unchanged."""

import builtins
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import danlu
from danlu.config import validate
from danlu.errors import DanluError
from danlu.families.image import reader
from danlu.families.image.data import _decode_fitting, _first_image, _pixel_stats
from danlu.families.image.decode import decode
from danlu.families.image.sources import FileNames, ImageSource, list_images, open_source
from tests.conftest import interrupted_at_epoch
from tests.images import image_folder


def mixed_folder(root: Path) -> Path:
    """Gray images first, then a palette image, a 16-bit gray one, colour ones, and a broken file."""
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = image_folder(root, n=40, size=10)
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / "bar" / "0100.png")
    Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8)).convert("P").save(
        folder / "bar" / "0101.png"
    )
    Image.fromarray(rng.integers(0, 60000, (10, 10), dtype=np.uint16)).save(folder / "column" / "0000a.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / "diagonal" / "0200.jpg")
    (folder / "column" / "0001a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def fitting_pass(folder: Path, **data):
    config = validate({"data": {"train": str(folder), "skip_bad_images": True, **data}}).data
    source = open_source(str(folder))
    geometry = _first_image(source, config)
    splits, parts = _decode_fitting(
        source, lambda: [np.arange(0, len(source), 2), np.arange(1, len(source), 2)], config, geometry
    )
    assert [len(ix) for ix in splits] == [(len(source) + 1) // 2, len(source) // 2]
    return source, geometry, parts


@pytest.mark.parametrize("workers", [False, True])
def test_the_pass_decodes_as_each_file_alone_would_in_workers_or_here(tmp_path, monkeypatch, workers):
    folder = mixed_folder(tmp_path / "f")
    monkeypatch.setattr(reader, "CHUNK", 7)  # colour first met inside a chunk, after whole gray chunks
    monkeypatch.setattr(reader, "PARALLEL_FILES", 1 if workers else 10**9)
    if workers:
        monkeypatch.setattr(reader, "_workers", lambda files: 2)
    source, geometry, parts = fitting_pass(folder)
    assert geometry.channels == 3 and geometry.size == (10, 10)
    for items, kept in parts:
        for row, i in enumerate(kept):
            expected = decode(source.paths[i], (10, 10), 3, "")  # what one file decoded alone gives
            np.testing.assert_array_equal(items.images[row], expected)
    kept = np.concatenate([k for _, k in parts])
    broken = [i for i in range(len(source)) if source.paths[i].endswith("0001a.png")]
    assert sorted(kept.tolist()) == sorted(set(range(len(source))) - set(broken))  # the broken file skipped


def test_workers_and_this_process_give_the_same_arrays_and_fingerprint(tmp_path, monkeypatch):
    folder = mixed_folder(tmp_path / "f")
    monkeypatch.setattr(reader, "CHUNK", 5)
    results = []
    for parallel in (10**9, 1):
        monkeypatch.setattr(reader, "PARALLEL_FILES", parallel)
        monkeypatch.setattr(reader, "_workers", lambda files, p=parallel: 1 if p > 1 else 2)
        source, _geometry, parts = fitting_pass(folder)
        results.append(([items.images for items, _ in parts], source.fingerprint()))
    (serial, serial_print), (forked, forked_print) = results
    for a, b in zip(serial, forked, strict=True):
        np.testing.assert_array_equal(a, b)
    assert serial_print == forked_print


def test_a_gray_folder_stays_one_channel_and_images_of_another_size_are_named(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "f", n=30, size=10)
    _source, geometry, parts = fitting_pass(folder)
    assert geometry.channels == 1 and parts[0][0].images.shape[1:] == (10, 10, 1)
    Image.new("L", (20, 16)).save(folder / "column" / "odd.png")
    with pytest.raises(DanluError, match=r"different sizes: '.*odd\.png' is 20x16, '.*' is 10x10"):
        fitting_pass(folder)
    _, geometry, parts = fitting_pass(folder, image_size=8)
    assert parts[0][0].images.shape[1:] == (8, 8, 1)


def test_training_reads_each_image_file_once(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "f", n=60, size=10)
    files = {str(p) for p in folder.rglob("*.png")}
    opened: dict[str, int] = {}

    def counting(real):
        def opener(file, *args, **kwargs):
            if str(file) in files:
                opened[str(file)] = opened.get(str(file), 0) + 1
            return real(file, *args, **kwargs)

        return opener

    monkeypatch.setattr(builtins, "open", counting(builtins.open))  # Pillow's way
    monkeypatch.setattr(os, "open", counting(os.open))  # the pass's way
    args = [f"data.train={folder}", "train.epochs=1", "model.channels=[4]"]
    danlu.train(None, args, out=tmp_path / "run", progress=False)
    first = min(files, key=lambda f: f.split("/"))
    assert set(opened) == files
    assert {f: n for f, n in opened.items() if n != 1} == {first: 2}  # its header sets the geometry


def old_fingerprint(paths: list[str]) -> str:
    """The content hash danlu recorded before listings: each file's path and the SHA-256 of its bytes."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path) + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def test_a_recheck_reads_no_file_until_the_listing_changes(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "f", n=30, size=10)
    recorded = open_source(str(folder)).fingerprint()
    paths = [str(folder / name) for name in list_images(folder)]
    assert recorded["sha256"] == old_fingerprint(paths) and recorded["files"] == 30

    def no_reading(self, i):
        raise AssertionError("a file was read")

    with monkeypatch.context() as patch:
        patch.setattr(ImageSource, "read_file", no_reading)
        assert open_source(str(folder)).matches(recorded)
    first = Path(paths[0])
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert open_source(str(folder)).matches(recorded)
    assert open_source(str(folder)).matches(
        {k: recorded[k] for k in ("files", "bytes", "sha256")}
    )  # older runs
    data = bytearray(first.read_bytes())
    data[-20] ^= 1
    first.write_bytes(bytes(data))
    assert not open_source(str(folder)).matches(recorded)


def test_a_resume_goes_on_over_touched_files_and_stops_over_changed_ones(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "f", n=45, size=10)
    args = [f"data.train={folder}", "train.epochs=3", "model.channels=[4]"]
    out = tmp_path / "run"
    interrupted_at_epoch(monkeypatch, 2, lambda: danlu.train(None, args, out=out, progress=False))
    shutil.copytree(out, tmp_path / "copy")
    for path in folder.rglob("*.png"):  # copied or touched: new modification times, the same bytes
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with monkeypatch.context() as patch:
        patch.setattr(reader, "PARALLEL_FILES", 10**9)  # counted in this process
        reads = []
        real = ImageSource.matches
        patch.setattr(ImageSource, "matches", lambda self, e: reads.append(1) or real(self, e))
        run = danlu.train(resume=out, progress=False)
    assert len(run.metrics) == 3 and reads == [1]
    (folder / "bar" / "0000.png").unlink()
    with pytest.raises(DanluError, match="has changed since run"):
        danlu.train(resume=tmp_path / "copy", progress=False)


def test_file_names_keep_paths_in_arrays_and_list_in_path_order(tmp_path):
    for name in ("b/a.png", "b/a/c.png", "a.png", "b.PNG", "c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = list_images(tmp_path)
    expected = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix.lower() != ".txt")
    assert [tmp_path / n for n in names] == expected  # component by component, as Path sorts
    files = FileNames(str(tmp_path), names)
    assert [files[i] for i in range(len(files))] == [str(p) for p in expected]
    assert FileNames(".", ["x/y.png"])[0] == "x/y.png" and FileNames("", ["/abs/z.png"])[0] == "/abs/z.png"


def test_pixel_statistics_from_histograms_equal_float_arithmetic():
    images = np.random.default_rng(0).integers(0, 256, (500, 9, 7, 3), dtype=np.uint8)
    mean, std = _pixel_stats(images)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-9)


def test_a_listed_file_that_is_gone_is_named_or_skipped(tmp_path):
    from tests.images import csv_of_paths

    table = csv_of_paths(tmp_path, n=45, size=10)
    gone = next((tmp_path / "pictures").rglob("*.png"))
    gone.unlink()
    data = [f"data.train={table}", "data.image=file", "data.target=shape"]
    args = [*data, "train.epochs=1", "model.channels=[4]"]
    with pytest.raises(DanluError, match=rf"'{gone}' cannot be read"):
        danlu.train(None, args, out=tmp_path / "run", progress=False)
    run = danlu.train(None, [*args, "data.skip_bad_images=true"], out=tmp_path / "skipped", progress=False)
    assert sum(run.report["rows"].values()) == 44  # train, validation and test: all but the one gone
