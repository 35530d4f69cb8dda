"""The image family as a user meets it: the real CLI (train, evaluate, predict --plot, export) and a real
uvicorn server taking base64 images, refusing what is not an image with a 4xx naming it."""

import base64
import io
import json
import struct
import zlib

import httpx
import pandas as pd
import pytest

from tests.conftest import run_cli, same_weights, train_and_kill, write_config
from tests.e2e.test_serve_process import Server
from tests.images import CLASSES, image_folder, shapes


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images_cli")
    folder = image_folder(root / "shapes", n=150)
    config = write_config(
        root / "shapes.yaml",
        f"data:\n  train: {folder}\nmodel:\n  channels: [8, 16]\n  hidden: [32]\n"
        "train:\n  epochs: 6\n  batch_size: 16\n  lr: 0.003\n",
    )
    result = run_cli("train", str(config), "--out", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "accuracy=" in result.stdout
    return root / "run"


def test_cli_trains_evaluates_predicts_and_exports_images(image_run, tmp_path):
    report = json.loads((image_run / "report.json").read_text())
    assert report["family"] == "image" and report["test"]["accuracy"] > 0.8
    config = (image_run / "config.yaml").read_text()
    assert "family: image" in config and "type: cnn" in config  # resolved and saved
    evaluated = run_cli("evaluate", str(image_run), "--json")
    assert (
        evaluated.returncode == 0 and json.loads(evaluated.stdout)["accuracy"] == report["test"]["accuracy"]
    )

    new = image_folder(tmp_path / "new", n=12, seed=4)
    out, grid = tmp_path / "p.csv", tmp_path / "grid.png"
    result = run_cli("predict", str(image_run), str(new), "-o", str(out), "--plot", str(grid))
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(out)
    assert len(predictions) == 12 and set(predictions["prediction"]) <= set(CLASSES)
    assert grid.stat().st_size > 1000 and grid.read_bytes()[:4] == b"\x89PNG"

    exported = run_cli("export", str(image_run))
    assert exported.returncode == 0, exported.stderr
    assert "verified" in exported.stdout and (image_run / "export" / "model.onnx").is_file()


def png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels are not there: only the header is read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_the_server_predicts_base64_images_and_refuses_bad_ones(image_run):
    from PIL import Image

    images, _ = shapes(6, seed=8)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    server = Server(image_run)
    try:
        url = f"{server.url}/v1/predict"
        response = httpx.post(url, json={"images": encoded}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["predictions"]) == 6 and body["classes"] == list(CLASSES)
        data_url = "data:image/png;base64," + encoded[0]
        assert (
            httpx.post(url, json={"images": [data_url]}, timeout=30).json()["predictions"][0]
            == body["predictions"][0]
        )
        bad = {
            "not base64": "%%%",
            "not an image": base64.b64encode(b"hello, world").decode(),
            "too many pixels": base64.b64encode(png(10_000, 10_000)).decode(),
            "decompression bomb": base64.b64encode(png(30_000, 30_000)).decode(),
        }
        for reason, payload in bad.items():
            response = httpx.post(url, json={"images": [encoded[0], payload]}, timeout=30)
            assert response.status_code == 422, (reason, response.text)
            detail = response.json()["detail"][0]
            assert detail["loc"] == ["body", "images", 1], (reason, detail)
        meta = httpx.get(f"{server.url}/v1/metadata", timeout=10).json()
        assert meta["family"] == "image" and meta["channels"] == 1

        uploads = [("images", (f"{i}.png", base64.b64decode(e), "image/png")) for i, e in enumerate(encoded)]
        response = httpx.post(url, files=uploads, timeout=30)  # multipart: the same images as files
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == body["predictions"]
        broken = [uploads[0], ("images", ("bad.png", b"not an image", "image/png"))]
        response = httpx.post(url, files=broken, timeout=30)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "images", 1]
        schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        content = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
    finally:
        server.stop()


@pytest.mark.slow
def test_an_image_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    import danlu

    folder = image_folder(tmp_path / "f", n=60)
    config = write_config(
        tmp_path / "c.yaml",
        f"data:\n  train: {folder}\n  augment: light\nmodel:\n  channels: [8, 16]\n  hidden: [32]\n"
        "train:\n  epochs: 16\n  batch_size: 16\n",  # dropout and augmentation on: RNG state matters
    )
    full = danlu.train(config, out=tmp_path / "full", progress=False).path
    killed = tmp_path / "killed"
    train_and_kill(config, killed, epochs=3)
    result = run_cli("train", "--resume", str(killed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert same_weights(full, killed), "resumed weights differ from the uninterrupted run"
