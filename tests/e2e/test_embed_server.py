"""The embeddings server as clients meet it: a real `danlu serve CLIP_DIR` uvicorn process, the official
openai client's embeddings.create (which asks for base64 by default), 16 concurrent clients whose texts
share forward passes, SIGTERM, and the page in headless Chromium (an uploaded image's label bars, typed
texts' similarity matrix)."""

import base64
import signal
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from danlu.embeddings import load_encoder
from tests.e2e.test_serve_process import Server
from tests.e2e.test_web_page import CHROMEDRIVER, CHROMIUM, headless_chromium
from tests.embedding_models import tiny_image_text


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_image_text(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def server(clip_dir):
    server = Server(clip_dir, "--max-wait-ms", "20")
    yield server
    assert server.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def batches(server) -> tuple[float, float]:
    """(forward passes, inputs embedded) from the server's danlu_batch_rows histogram."""
    lines = httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()

    def value(name: str) -> float:
        return float(next(x for x in lines if x.startswith(name + " ")).split()[-1])

    return value("danlu_batch_rows_count"), value("danlu_batch_rows_sum")


def test_the_openai_client_gets_the_encoders_vectors(server, clip_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    texts = ["a photo of a cat", "an old car parked in the street"]
    answer = client.embeddings.create(model="clip", input=texts)  # base64 on the wire, decoded by the client
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    assert np.allclose(got, load_encoder(clip_dir).embed_texts(texts), atol=1e-6)
    assert answer.usage.prompt_tokens > 0 and answer.model == "clip"
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="tokens; clip reads at most 32"):
        client.embeddings.create(model="clip", input="the quick brown fox jumps over the dog " * 8)


def test_concurrent_clients_share_forward_passes(server):
    before = batches(server)
    failures: list[str] = []

    def client(i: int) -> None:
        for j in range(4):
            body = {"input": [f"a photo of a cat number {i} {j}", "two cats sleeping on a sofa"]}
            answer = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
            if answer.status_code != 200 or len(answer.json()["data"]) != 2:
                failures.append(answer.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = batches(server)
    assert not failures
    assert after[1] - before[1] == 16 * 4 * 2  # every input embedded once
    assert after[0] - before[0] < 16 * 4  # fewer forward passes than requests: they were batched together


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (make setup)")
def test_the_page_labels_an_upload_and_compares_texts(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(picture)
    browser = headless_chromium()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "image-file").send_keys(str(picture))
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "preview").get_attribute("src"))
        labels = browser.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys("cat, dog, car")
        browser.find_element(By.ID, "label-button").click()
        top = WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "top-label"))).text
        rows = browser.find_elements(By.CSS_SELECTOR, ".bar-row")
        shown = {
            r.get_attribute("data-label"): float(r.find_element(By.CLASS_NAME, "probability").text)
            for r in rows
        }
        image = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        body = {"images": [image], "labels": ["cat", "dog", "car"], "templates": ["a photo of a {}."]}
        expected = httpx.post(f"{server.url}/v1/zero-shot", json=body, timeout=30).json()["data"][0]
        assert top == f"Label: {expected['label']}"
        assert shown == pytest.approx(
            {k: round(v, 3) for k, v in expected["probabilities"].items()}, abs=1e-3
        )

        browser.find_element(By.ID, "compare-button").click()
        table = WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "similarity")))
        cells = [
            [float(c.text) for c in row.find_elements(By.TAG_NAME, "td")]
            for row in table.find_elements(By.TAG_NAME, "tr")[1:]
        ]
        texts = ["a photo of a cat", "a photo of a dog", "an old car in the street"]
        vectors = np.array(
            [
                d["embedding"]
                for d in httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}).json()["data"]
            ]
        )
        assert np.allclose(cells, vectors @ vectors.T, atol=2e-3) and len(cells) == 3
    finally:
        browser.quit()
