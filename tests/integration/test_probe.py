"""Linear probes: an image run with model.pretrained = a tiny random CLIP directory trains a head on the
frozen tower's cached features; its tower computes the model's own image features; the finished run
needs no model.pretrained (evaluate, predict, a verified ONNX export); report.json holds the image-text
model's zero-shot accuracy on the same held-out images; checkpoints hold the head alone."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import danlu
from danlu.errors import DanluError
from danlu.export import export_run
from danlu.families.image.probe import pretrained_tower
from danlu.training import checkpoint as ckpt
from tests.conftest import interrupted_at_epoch, same_weights
from tests.embedding_models import tiny_image_text

COLORS = {"cat": (200, 40, 40), "dog": (40, 40, 200), "car": (40, 200, 40)}


def folder(root, per_class=16):
    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (36, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    clip = tiny_image_text(root / "clip")
    config = {
        "data": {"train": str(folder(root / "pics")), "test_fraction": 0.25, "val_fraction": 0.15},
        "model": {"pretrained": str(clip)},
        "train": {"epochs": 30, "lr": 0.05},
        "output": str(root / "run"),
    }
    return danlu.train(config, progress=False), clip


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_tower_computes_the_models_own_image_features(tmp_path, kind):
    import transformers

    path = tiny_image_text(tmp_path / kind, kind)
    tower, info = pretrained_tower(path)
    model = getattr(transformers, {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]).from_pretrained(path)
    pixels = torch.randn(3, 3, *info["size"])
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=pixels)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
        ours = tower(pixels)
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() >= 0.9999
    assert info["kind"] == kind and info["dimensions"] == ours.shape[1]


def test_a_probe_learns_reports_its_zero_shot_baseline_and_caches_features(probe_run):
    run, _ = probe_run
    report = run.report
    assert report["test"]["accuracy"] == 1.0  # three well-separated colours
    zero_shot = report["image"]
    assert (
        0.0 <= zero_shot["zero_shot_accuracy"] <= 1.0
        and zero_shot["zero_shot_rows"] == report["rows"]["test"]
    )
    cached = sorted(p.name.rsplit("-", 1)[-1] for p in (run.path / "cache").glob("features-*.npy"))
    assert cached == ["test.npy", "train.npy", "validation.npy"]
    state = json.loads((run.path / "preprocess.json").read_text())
    assert state["tower"]["kind"] == "clip" and [state["height"], state["width"]] == state["tower"]["size"]
    saved = ckpt.load_checkpoint(run.path / "checkpoints" / "last.pt")[ckpt.MODEL_KEY]
    assert set(saved) == {"net.head.weight", "net.head.bias"}  # the frozen tower is not in checkpoints


def test_a_finished_probe_needs_no_pretrained_directory(probe_run, tmp_path):
    run, clip = probe_run
    pictures = [
        np.asarray(Image.open(p)) for p in sorted((run.path.parent / "pics" / "dog").glob("*.png"))[:4]
    ]
    before = danlu.load(run.path).predict(pictures)
    moved = tmp_path / "elsewhere"
    shutil.move(str(clip), moved)
    try:
        predictor = danlu.load(run.path)
        after = predictor.predict(pictures)
        assert list(after) == list(before) == ["dog"] * 4
        assert danlu.evaluate(run.path)["accuracy"] == 1.0
        result = export_run(run.path, "onnx", None, str(tmp_path / "probe.onnx"), 0.01)
        assert result["max_abs_diff"] < 1e-4
    finally:
        shutil.move(str(moved), clip)


def test_model_pretrained_that_is_no_image_text_model_is_one_clear_error(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    config = {
        "data": {"train": str(folder(tmp_path / "pics", 4))},
        "model": {"pretrained": str(tmp_path / "bert")},
        "output": str(tmp_path / "run"),
    }
    with pytest.raises(DanluError, match="no local CLIP or SigLIP directory"):
        danlu.train(config, progress=False)


def test_a_resumed_probe_ends_with_the_weights_of_an_uninterrupted_one(probe_run, tmp_path, monkeypatch):
    run, clip = probe_run
    config = {
        "data": {"train": str(run.path.parent / "pics"), "test_fraction": 0.25, "val_fraction": 0.15},
        "model": {"pretrained": str(clip)},
        "train": {"epochs": 4, "lr": 0.05},
    }

    def train(out):
        return danlu.train({**config, "output": str(out)}, progress=False)

    whole = train(tmp_path / "whole")
    interrupted_at_epoch(monkeypatch, 3, lambda: train(tmp_path / "stopped"))
    resumed = danlu.train(resume=tmp_path / "stopped", progress=False)
    assert same_weights(whole.path, resumed.path)
