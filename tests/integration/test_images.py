"""The image family end to end in-process: every source kind, training a CNN and a ResNet, evaluate,
predict from paths, arrays and PIL images, the held-out images in the run, export, and exact resume."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import danlu
from danlu.data.batches import Batch, shuffle_generator
from danlu.errors import DanluError
from danlu.families.image.data import augmenter
from tests.conftest import interrupted_at_epoch
from tests.images import CLASSES, csv_of_paths, idx_files, image_folder, npz_file, shapes

FAST = [
    "train.epochs=6",
    "train.batch_size=16",
    "train.lr=3e-3",
    "model.channels=[8,16]",
    "model.hidden=[32]",
]


def fit(out, train, *overrides):
    return danlu.train(None, [f"data.train={train}", *FAST, *overrides], out=out, progress=False)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return fit(root / "run", image_folder(root / "shapes", n=150))


def test_an_image_folder_trains_a_cnn_and_learns(folder_run):
    report = folder_run.report
    assert report["family"] == "image" and report["classes"] == list(CLASSES)
    assert report["test"]["accuracy"] > 0.8  # three shapes; guessing gives 1/3
    state = json.loads((folder_run.path / "preprocess.json").read_text())
    assert (state["height"], state["width"], state["channels"]) == (12, 12, 1)
    assert 0 < state["mean"][0] < 1 and state["std"][0] > 0
    assert (folder_run.path / "heldout.npz").is_file()
    assert (folder_run.path / "plots" / "misclassified.png").is_file()
    assert danlu.evaluate(folder_run.path)["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_the_predictor_takes_paths_arrays_and_pil_images(folder_run, tmp_path):
    from PIL import Image

    predictor = danlu.load(folder_run.path)
    images, labels = shapes(12, seed=5)
    by_array = predictor.predict(images)
    assert by_array.shape == (12,) and set(by_array) <= set(CLASSES)
    assert np.mean(by_array == np.array(CLASSES)[labels]) > 0.7
    Image.fromarray(images[0]).save(tmp_path / "one.png")
    assert predictor.predict(str(tmp_path / "one.png"))[0] == by_array[0]
    assert predictor.predict(Image.fromarray(images[1]).convert("RGB"))[0] == by_array[1]
    big = Image.fromarray(images[2]).resize((48, 48))  # resized to the model's 12x12
    assert predictor.predict_proba(big).shape == (1, 3)
    with pytest.raises(DanluError, match="is not an image in a format danlu reads"):
        (tmp_path / "fake.png").write_text("not a picture")
        predictor.predict(str(tmp_path / "fake.png"))


@pytest.mark.parametrize("kind", ["idx", "npz", "csv"])
def test_every_source_kind_trains(tmp_path, kind):
    if kind == "idx":
        train, extra = idx_files(tmp_path / "mnist"), []
    elif kind == "npz":
        train, extra = npz_file(tmp_path / "shapes.npz"), []
    else:
        train, extra = csv_of_paths(tmp_path), ["data.image=file", "data.target=shape"]
    run = fit(tmp_path / "run", train, "train.epochs=2", *extra)
    assert run.report["family"] == "image" and run.report["rows"]["train"] == 63
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(run.report["test"]["accuracy"])


def test_a_table_of_paths_written_on_windows_is_read_with_slashes(tmp_path):
    """pictures\\circle\\0.png from a CSV made on Windows names pictures/circle/0.png here (training,
    predicting, embedding); a file whose own name holds a backslash is read as named."""
    from pathlib import Path

    from danlu.embeddings.files import read_items
    from danlu.families.image.sources import open_source

    table = csv_of_paths(tmp_path, n=12)
    frame = pd.read_csv(table)
    frame["file"] = frame["file"].str.replace("/", "\\")
    odd = tmp_path / "odd\\name.png"  # a legal POSIX file name
    odd.write_bytes((tmp_path / frame["file"][0].replace("\\", "/")).read_bytes())
    frame.loc[0, "file"] = odd.name
    frame.to_csv(table, index=False)
    source = open_source(str(table), "file", "shape")
    paths = [source.paths[i] for i in range(len(source.paths))]
    assert paths[0] == str(odd) and all(Path(p).is_file() for p in paths)
    assert paths[1] == str(tmp_path / frame["file"][1].replace("\\", "/"))
    assert read_items(table, "file").values == paths
    args = [f"data.train={table}", "data.image=file", "data.target=shape", "train.epochs=1"]
    assert danlu.train(None, args, out=tmp_path / "r", progress=False).report["rows"]["train"] > 0


def test_a_resnet_and_augmentation_train(tmp_path):
    run = fit(
        tmp_path / "run", image_folder(tmp_path / "f", n=60), "model.type=resnet", "data.augment=standard"
    )
    assert run.report["test"]["accuracy"] is not None
    assert any(k.startswith("net.") for k in load_file(run.path / "model.safetensors"))


def test_augmentation_keeps_shapes_and_replays_from_the_epoch_seed():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    batch = Batch({"images": images}, torch.zeros(2))
    augment = augmenter("standard", (8, 8))
    a = augment(batch, shuffle_generator(0, 3)).inputs["images"]
    b = augment(batch, shuffle_generator(0, 3)).inputs["images"]
    c = augment(batch, shuffle_generator(0, 4)).inputs["images"]
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mixed_sizes_need_an_image_size(tmp_path):
    from PIL import Image

    root = image_folder(tmp_path / "f", n=30)
    Image.new("L", (20, 16)).save(root / "bar" / "odd.png")
    with pytest.raises(DanluError, match="different sizes"):
        fit(tmp_path / "run", root)
    run = fit(tmp_path / "run2", root, "data.image_size=10", "train.epochs=1")
    assert json.loads((run.path / "preprocess.json").read_text())["height"] == 10


def test_bad_images_are_named_or_skipped(tmp_path):
    root = image_folder(tmp_path / "f", n=30)
    (root / "bar" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DanluError, match=r"broken\.png.* is not a readable image"):
        fit(tmp_path / "run", root)
    run = fit(tmp_path / "run2", root, "data.skip_bad_images=true", "train.epochs=1")
    assert sum(run.report["rows"].values()) == 30


def test_one_class_is_an_error(tmp_path):
    root = image_folder(tmp_path / "f", n=30)
    for name in ("column", "diagonal"):
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()
    with pytest.raises(DanluError, match="single class"):
        fit(tmp_path / "run", root)


def test_predict_file_writes_paths_predictions_and_probabilities(folder_run, tmp_path):
    from danlu.api import predict_file

    folder = image_folder(tmp_path / "new", n=9, seed=3)
    rows = predict_file(folder_run.path, folder, tmp_path / "p.csv")
    out = pd.read_csv(tmp_path / "p.csv")
    assert rows == 9 and list(out.columns) == ["path", "prediction", *(f"proba_{c}" for c in CLASSES)]
    assert np.allclose(out[[f"proba_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-5)


def test_unreadable_images_stop_predict_and_evaluate_unless_skipped(folder_run, tmp_path, caplog):
    from danlu.api import predict_file

    folder = image_folder(tmp_path / "new", n=9, seed=3)
    clean = predict_file(folder_run.path, folder, tmp_path / "clean.csv", chunk_rows=4)
    metrics = danlu.evaluate(folder_run.path, folder)
    broken = folder / CLASSES[0] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (folder / CLASSES[1] / "zz-empty.png").write_bytes(b"")
    with pytest.raises(DanluError, match=r"broken\.png"):
        predict_file(folder_run.path, folder, tmp_path / "p.csv", chunk_rows=4)
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(DanluError, match=r"broken\.png"):
        danlu.evaluate(folder_run.path, folder)

    rows = predict_file(folder_run.path, folder, tmp_path / "p.csv", chunk_rows=4, skip_bad_images=True)
    assert rows == clean == 9
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "clean.csv"))
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned == [f"skipped 2 unreadable images: {broken}, {folder / CLASSES[1] / 'zz-empty.png'}"]
    assert danlu.evaluate(folder_run.path, folder, skip_bad_images=True) == metrics

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.png").write_bytes(broken.read_bytes())
    with pytest.raises(DanluError, match=r"no image in .* could be read"):
        predict_file(folder_run.path, only_bad, tmp_path / "none.csv", skip_bad_images=True)
    assert not (tmp_path / "none.csv").exists()


def test_skipping_unreadable_images_is_refused_for_other_runs():
    from danlu.api import _check_skip
    from danlu.families import get

    _check_skip(get("image"), True)
    with pytest.raises(DanluError, match="for image runs; this is a tabular run"):
        _check_skip(get("tabular"), True)


def test_onnx_export_takes_uint8_pixels_and_is_verified(folder_run):
    import onnxruntime as ort

    from danlu.export import export_run

    result = export_run(folder_run.path, "onnx")
    assert result["max_abs_diff"] <= 1e-4 and result["rows"] == folder_run.report["rows"]["test"]
    session = ort.InferenceSession(result["path"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    images, _ = shapes(4, seed=9)
    (proba,) = session.run(None, {"images": images[:, None]})
    assert np.allclose(proba, danlu.load(folder_run.path).predict_proba(images), atol=1e-4)


@pytest.mark.parametrize("budget", ["", "data.memory_budget_gb=0.000001"])  # in memory; mapped from cache
def test_resume_after_a_stop_gives_identical_weights(tmp_path, monkeypatch, budget):

    data = image_folder(tmp_path / "f", n=60)
    settings = ["model.dropout=0.3", "data.augment=light", *([budget] if budget else [])]
    full = fit(tmp_path / "full", data, *settings)
    interrupted_at_epoch(monkeypatch, 4, lambda: fit(tmp_path / "stopped", data, *settings))
    resumed = danlu.train(resume=tmp_path / "stopped", progress=False)
    a, b = load_file(full.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_large_held_out_image_sets_are_recorded_by_index_and_checked(tmp_path, monkeypatch):
    from danlu.data import heldout

    monkeypatch.setattr(heldout, "MAX_STORED_BYTES", 0)
    folder = image_folder(tmp_path / "f", n=60)
    run = fit(tmp_path / "run", folder, "train.epochs=2")
    record = json.loads((run.path / "heldout.json").read_text())
    assert record["kind"] == "indices" and not (run.path / "heldout.npz").exists()
    assert danlu.evaluate(run.path)["accuracy"] == pytest.approx(run.report["test"]["accuracy"])
    first = sorted((folder / "bar").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # one image file changes
    with pytest.raises(DanluError, match="has changed since run"):
        danlu.evaluate(run.path)


def test_an_image_run_packages(folder_run, tmp_path):
    from danlu.env.package import package_run

    result = package_run(folder_run.path, tmp_path / "pkg")
    assert (tmp_path / "pkg" / "run" / "model.safetensors").is_file() and "Dockerfile" in result["files"]
    assert not (tmp_path / "pkg" / "run" / "heldout.npz").exists() and "heldout.npz" in result["left_out"]


def test_torchscript_and_int8_exports_of_an_image_run_are_verified(folder_run):
    from danlu.export import export_run

    script = export_run(folder_run.path, "torchscript")
    assert script["max_abs_diff"] <= 1e-4
    int8 = export_run(folder_run.path, "onnx", "int8", max_metric_drop=0.05)
    assert int8["metric_drop"] <= 0.05 and int8["bytes"] < export_run(folder_run.path, "onnx")["bytes"]


def test_images_over_the_memory_budget_are_mapped_from_the_run_cache_with_the_same_weights(tmp_path):
    folder = image_folder(tmp_path / "f", n=60)
    common = ("data.augment=light", "train.epochs=3")
    memory = fit(tmp_path / "memory", folder, *common)
    mapped = fit(tmp_path / "mapped", folder, *common, "data.memory_budget_gb=0.000001")
    cached = sorted(p.name for p in (mapped.path / "cache").iterdir())
    assert [p for p in cached if p.endswith(".npy")] and [p for p in cached if p.endswith(".json")]
    assert not (memory.path / "cache").exists()
    a, b = (load_file(run.path / "model.safetensors") for run in (memory, mapped))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches, gathered from the map
    assert mapped.report["test"]["accuracy"] == memory.report["test"]["accuracy"]

    from danlu.env.package import package_run

    package_run(mapped.path, tmp_path / "pkg")
    assert not (tmp_path / "pkg" / "run" / "cache").exists()  # never packaged


def test_color_and_the_precision_that_ran_are_recorded(tmp_path):
    from danlu.inference import resolve_precision

    run = fit(tmp_path / "run", image_folder(tmp_path / "f", n=30), "data.color=rgb", "train.epochs=1")
    assert json.loads((run.path / "preprocess.json").read_text())["channels"] == 3  # gray files as RGB
    assert run.report["precision"] == resolve_precision(torch.device("cpu"), "auto")  # the image default
    assert danlu.load(run.path).predict_proba(shapes(2)[0]).shape == (2, 3)
