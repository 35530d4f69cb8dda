"""Heavy requests never hold up the event loop, through real servers: while a body of many large images,
or a chat request of megabytes of text, is being handled, /healthz still answers at once (a
Kubernetes liveness probe waits 1 s), and the request itself gets its 413/400/422 or its answer.
Images are opened only in the formats danlu reads."""

import base64
import io
import json
import threading
import time

import httpx
import pytest

from tests.chat_models import tiny_llama
from tests.e2e.test_serve_process import Server
from tests.images import image_folder

HEALTHY_S = 0.1
# On a machine so loaded that the request itself takes seconds, a probe can wait on the scheduler longer
# than HEALTHY_S with the loop free; work done on the loop would hold it for most of the request instead
LOOP_SHARE = 0.25


def zero_png(side: int = 2048) -> bytes:
    """An all-black side x side PNG: a few kilobytes that decode to side^2 pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def sent_while_healthy(server: Server, send) -> httpx.Response:
    """send()'s response, sent in a thread while /healthz is asked every 10 ms, whose slowest answer
    must stay under HEALTHY_S (or under LOOP_SHARE of the whole request, where load makes that longer)."""
    outcome = {}
    sender = threading.Thread(target=lambda: outcome.update(response=send()))
    slowest = 0.0
    with httpx.Client(timeout=30) as client:
        client.get(f"{server.url}/healthz")  # a warm connection
        started = time.perf_counter()
        sender.start()
        while sender.is_alive():
            start = time.perf_counter()
            assert client.get(f"{server.url}/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.01)
    sender.join()
    elapsed = time.perf_counter() - started
    assert slowest < max(HEALTHY_S, LOOP_SHARE * elapsed), (slowest, elapsed)
    return outcome["response"]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    import danlu

    root = tmp_path_factory.mktemp("loop")
    folder = image_folder(root / "shapes", n=60)
    overrides = [f"data.train={folder}", "train.epochs=1", "model.channels=[4]", "model.hidden=[8]"]
    run = danlu.train(None, overrides, out=root / "run", progress=False)
    server = Server(run.path)
    server.run_path = run.path
    yield server
    server.stop()


def test_a_body_of_many_large_images_is_refused_by_its_pixels_without_stalling(image_server):
    png = zero_png()
    body = json.dumps({"images": [base64.b64encode(png).decode()] * 420}).encode()
    url = f"{image_server.url}/v1/predict"
    headers = {"content-type": "application/json"}
    response = sent_while_healthy(
        image_server, lambda: httpx.post(url, content=body, headers=headers, timeout=60)
    )
    assert response.status_code == 413, response.text[:300]
    assert "pixels in all, over the limit" in response.json()["detail"][0]["msg"]
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(420)]
    response = sent_while_healthy(image_server, lambda: httpx.post(url, files=files, timeout=60))
    assert response.status_code == 413, response.text[:300]


def test_large_images_within_the_limit_decode_off_the_event_loop(image_server):
    encoded = base64.b64encode(zero_png()).decode()
    url = f"{image_server.url}/v1/predict"
    response = sent_while_healthy(
        image_server, lambda: httpx.post(url, json={"images": [encoded] * 20}, timeout=60)
    )
    assert response.status_code == 200 and len(response.json()["predictions"]) == 20


@pytest.mark.parametrize("fmt", ["TGA", "PPM", "EPS"])
def test_only_the_formats_danlu_reads_are_opened(image_server, fmt, tmp_path):
    """Pillow reads TGA and PPM (and EPS, through Ghostscript where installed); danlu opens PNG, JPEG,
    BMP, WebP, GIF and TIFF only, on the server and in the Python API alike."""
    from PIL import Image

    import danlu
    from danlu.errors import DanluError

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), "white").save(buffer, fmt)
    data = buffer.getvalue()
    response = httpx.post(
        f"{image_server.url}/v1/predict", json={"images": [base64.b64encode(data).decode()]}, timeout=30
    )
    assert response.status_code == 422
    assert "not an image in a format danlu reads" in response.json()["detail"][0]["msg"]
    disguised = tmp_path / "photo.png"
    disguised.write_bytes(data)
    with pytest.raises(DanluError, match="not an image in a format danlu reads"):
        danlu.load(image_server.run_path).predict(str(disguised))


def test_a_huge_chat_request_is_refused_before_tokenizing_without_stalling(tmp_path):
    server = Server(tiny_llama(tmp_path / "tiny"), "--max-body-mb", "8")
    try:
        url = f"{server.url}/v1/chat/completions"
        messages = [{"role": "user", "content": "the quick brown fox " * 200_000}]  # 4 MB of text
        response = sent_while_healthy(
            server, lambda: httpx.post(url, json={"messages": messages}, timeout=60)
        )
        assert response.status_code == 400, response.text[:300]
        assert "characters; at most" in response.json()["error"]["message"]
        many = [{"role": "user", "content": "hi"}] * 2000
        response = httpx.post(url, json={"messages": many}, timeout=60)
        assert response.status_code == 400 and "at most 1024" in response.json()["error"]["message"]
    finally:
        server.stop()
