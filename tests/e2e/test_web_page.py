"""The web page in real headless Chromium (Debian's chromium and chromedriver, installed by `make setup`):
fill the generated form, press Predict, read the prediction and the probability bars."""

import shutil

import httpx
import pytest

from tests.conftest import mixed_frame, train_quietly
from tests.e2e.test_serve_process import Server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver: `make setup` installs them (apt)",
)


def headless_chromium():
    """A selenium driver of Debian's chromium, headless; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


def test_form_predicts_with_probability_bars(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run = train_quietly(tmp_path / "cls", mixed_frame(400), "label", "train.epochs=20")
    server = Server(run.path)
    try:
        browser.get(server.url + "/")
        assert browser.find_element(By.NAME, "x0").get_attribute("type") == "number"
        color = Select(browser.find_element(By.NAME, "color"))
        assert [o.text for o in color.options] == ["blue", "green", "red"]
        for name, value in (("x0", "1.5"), ("x1", "-0.25")):
            field = browser.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        color.select_by_visible_text("red")
        browser.find_element(By.ID, "predict").click()
        shown = (
            WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "prediction"))).text
        )

        record = {"x0": 1.5, "x1": -0.25, "color": "red"}
        expected = httpx.post(f"{server.url}/v1/predict", json={"records": [record]}).json()
        assert shown == f"Prediction: {expected['predictions'][0]}"
        rows = browser.find_elements(By.CSS_SELECTOR, ".bar-row")
        assert [r.get_attribute("data-class") for r in rows] == ["high", "low", "mid"]
        shown_proba = [float(r.find_element(By.CLASS_NAME, "probability").text) for r in rows]
        assert shown_proba == pytest.approx(expected["probabilities"][0], abs=1e-3)

        field = browser.find_element(By.NAME, "x0")  # an empty number is a missing value, not an error
        field.clear()
        browser.find_element(By.ID, "predict").click()
        WebDriverWait(browser, 20).until(
            ready.text_to_be_present_in_element((By.ID, "result"), "Prediction:")
        )
    finally:
        server.stop()


def test_an_image_run_gets_an_upload_field_and_a_drawing_canvas(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    import danlu
    from tests.images import CLASSES, image_folder, shapes

    folder = image_folder(tmp_path / "shapes", n=90)
    overrides = [f"data.train={folder}", "train.epochs=3", "model.channels=[8,16]", "model.hidden=[32]"]
    run = danlu.train(None, overrides, out=tmp_path / "run", progress=False)
    server = Server(run.path)
    try:
        browser.get(server.url + "/")
        upload = browser.find_element(By.ID, "image-file")
        from PIL import Image

        images, _ = shapes(1, seed=2)
        Image.fromarray(images[0]).save(tmp_path / "one.png")
        upload.send_keys(str(tmp_path / "one.png"))
        browser.find_element(By.ID, "predict").click()
        shown = (
            WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "prediction"))).text
        )
        expected = danlu.load(run.path).predict(str(tmp_path / "one.png"))[0]
        assert shown == f"Prediction: {expected}"
        assert [
            r.get_attribute("data-class") for r in browser.find_elements(By.CSS_SELECTOR, ".bar-row")
        ] == list(CLASSES)

        browser.get(server.url + "/")  # a fresh page: draw instead of uploading
        canvas = browser.find_element(By.ID, "draw")
        ActionChains(browser).move_to_element_with_offset(canvas, -100, 0).click_and_hold().move_by_offset(
            200, 0
        ).release().perform()
        browser.find_element(By.ID, "predict").click()
        shown = (
            WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.ID, "prediction"))).text
        )
        assert shown.removeprefix("Prediction: ") in CLASSES
    finally:
        server.stop()
