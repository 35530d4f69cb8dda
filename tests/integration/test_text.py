"""The text family end to end in-process, on a tiny random BERT with the real MiniLM tokenizer: training
learns, RUN/hf loads in transformers, predictions from texts, evaluate, verified exports, exact resume,
the tokenization cache, a frozen encoder, regression, JSONL/Parquet sources and the errors users meet."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import danlu
from danlu.errors import DanluError
from tests.conftest import interrupted_at_epoch
from tests.texts import reviews, tiny_encoder

FAST = ["data.text=review", "data.max_length=64", "train.epochs=10", "train.lr=3e-3", "train.batch_size=16"]


def fit(out, data, encoder, *overrides, target="label"):
    args = [f"data.train={data}", f"data.target={target}", f"model.pretrained={encoder}", *FAST, *overrides]
    return danlu.train(None, args, out=out, progress=False)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("encoder") / "bert")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "reviews.csv"
    reviews(240).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, data, encoder):
    return fit(tmp_path_factory.mktemp("text_run") / "run", data, encoder)


def test_a_text_run_learns_and_reports_padding_and_tokens(text_run):
    report = text_run.report
    assert report["family"] == "text" and report["test"]["accuracy"] > 0.9
    assert 0 <= report["text"]["padding_share"] < 0.2 and report["text"]["tokens_per_second"] > 0
    config = text_run.config
    assert config.data.family == "text" and config.model.type == "pretrained"
    assert config.train.schedule == "linear" and config.train.warmup == 0.1  # the family's defaults


def test_run_hf_loads_in_transformers_with_the_same_outputs(text_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = text_run.path / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    texts = ["a great and charming film", "boring dull plot", "the movie"]
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    ours = danlu.load(text_run.path).predict_proba(texts)
    assert np.allclose(torch.softmax(logits, 1).numpy(), ours, atol=1e-5)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert os.path.samefile(hf / "model.safetensors", text_run.path / "model.safetensors")  # one file


def test_predict_takes_a_text_or_a_list_and_keeps_the_order(text_run):
    predictor = danlu.load(text_run.path)
    texts = ["great", "the plot was really quite awful and dull and tedious overall", "superb fun", "bad"]
    batch = predictor.predict_proba(texts)
    one_by_one = np.concatenate([predictor.predict_proba(t) for t in texts])
    assert np.allclose(batch, one_by_one, atol=1e-5)  # padding inside a batch never changes a text's answer
    assert predictor.predict(texts).tolist() == ["pos", "neg", "pos", "neg"]
    with pytest.raises(DanluError, match="not a text"):
        predictor.predict(["fine", 3])


def test_evaluate_and_predict_files(text_run, data, tmp_path):
    assert danlu.evaluate(text_run.path)["accuracy"] == pytest.approx(text_run.report["test"]["accuracy"])
    from danlu.api import predict_file

    out = tmp_path / "p.csv"
    predict_file(text_run.path, data, out)
    import pandas as pd

    frame = pd.read_csv(out)
    assert list(frame.columns[-3:]) == ["prediction", "proba_neg", "proba_pos"] and len(frame) == 240
    assert (frame["prediction"] == frame["label"]).mean() > 0.9
    unseen = tmp_path / "unseen.csv"  # a label column with a label the run never saw: not an error to predict
    pd.DataFrame({"review": ["superb", "awful"], "label": ["meh", "meh"]}).to_csv(unseen, index=False)
    predict_file(text_run.path, unseen, tmp_path / "u.csv")
    assert pd.read_csv(tmp_path / "u.csv")["prediction"].tolist() == ["pos", "neg"]
    # rows to predict are not training data: their errors say so, without data.text's fix
    for name, frame, line in [
        (
            "gap.csv",
            {"review": ["superb", None]},
            "text column 'review' is empty at row 2 of the input (fix: ",
        ),
        ("other.csv", {"text": ["superb"]}, "text column 'review' is not in the input (fix: give the rows a"),
    ]:
        pd.DataFrame(frame).to_csv(tmp_path / name, index=False)
        with pytest.raises(DanluError) as error:
            predict_file(text_run.path, tmp_path / name, tmp_path / "n.csv")
        assert str(error.value).startswith(line) and "data.text" not in str(error.value)


def test_onnx_export_takes_token_ids_of_any_length_and_is_verified(text_run):
    import onnxruntime as ort

    from danlu.export import export_run
    from danlu.families.text.codec import feeds

    result = export_run(text_run.path, "onnx")
    assert result["max_abs_diff"] < 1e-4 and result["split"] == "test"
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    predictor = danlu.load(text_run.path)
    for texts in (["great"], ["a long and really quite superb story overall", "dull", "fun film"]):
        got = session.run(None, feeds(predictor.state, texts))[0]
        assert np.allclose(got, predictor.predict_proba(texts), atol=1e-5)
    from danlu.runners import OnnxRunner

    many = reviews(150, seed=3)["review"].tolist()  # more than one pass of the runner (64 texts)
    runner = OnnxRunner(result["path"], predictor.family.exporter(predictor.state))
    assert np.allclose(runner.run(many), predictor.predict_proba(many), atol=1e-5)
    for fmt, quantize in (("torchscript", None), ("onnx", "int8")):
        check = export_run(text_run.path, fmt, quantize=quantize)
        assert check["metric_drop"] <= 0.01


@pytest.mark.slow
def test_resume_after_a_stop_gives_identical_weights_and_reuses_the_tokens(
    tmp_path, data, encoder, monkeypatch
):
    from danlu.families.text import data as text_data

    settings = ["train.epochs=4", "train.precision=fp32"]  # the encoder's dropout is on: RNG state matters
    full = fit(tmp_path / "full", data, encoder, *settings)
    interrupted_at_epoch(monkeypatch, 3, lambda: fit(tmp_path / "stopped", data, encoder, *settings))
    assert list((tmp_path / "stopped" / "cache").glob("tokens-*.npz"))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the resumed run tokenized again instead of reading RUN/cache")

    monkeypatch.setattr(text_data, "tokenize", no_tokenizing)
    resumed = danlu.train(resume=tmp_path / "stopped", progress=False)
    a, b = load_file(full.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_frozen_encoder_trains_the_head_only(tmp_path, data, encoder, text_run):
    start = load_file(encoder / "model.safetensors")

    def encoder_unchanged(weights) -> bool:
        shared = [k for k in weights if k.startswith("bert.") and k.removeprefix("bert.") in start]
        assert len(shared) > 20
        return all(torch.equal(weights[k], start[k.removeprefix("bert.")]) for k in shared)

    run = fit(tmp_path / "frozen", data, encoder, "model.freeze_encoder=true", "train.epochs=2")
    assert encoder_unchanged(load_file(run.path / "model.safetensors"))
    assert not encoder_unchanged(load_file(text_run.path / "model.safetensors"))  # fine-tuned: it moves
    assert run.report["test"]["accuracy"] is not None


def test_regression_on_texts_and_jsonl_and_parquet_sources(tmp_path, encoder):
    frame = reviews(240, seed=1)
    jsonl = tmp_path / "stars.jsonl"
    frame.to_json(jsonl, orient="records", lines=True)
    run = fit(tmp_path / "stars", jsonl, encoder, "data.task=regression", target="stars")
    assert run.report["task"] == "regression" and run.report["test"]["r2"] > 0.5
    hf_config = json.loads((run.path / "hf" / "config.json").read_text())
    assert hf_config["problem_type"] == "regression" and "danlu_target_mean" in hf_config
    values = danlu.load(run.path).predict(["great superb", "awful dull"])
    assert values[0] > 3.5 > values[1]

    parquet = tmp_path / "reviews.parquet"
    frame.to_parquet(parquet)
    assert fit(tmp_path / "pq", parquet, encoder, "train.epochs=1").report["family"] == "text"


def test_a_text_run_packages_with_its_hf_directory(text_run, tmp_path):
    from danlu.env.package import package_run

    package_run(text_run.path, tmp_path / "pkg")
    packaged = tmp_path / "pkg" / "run"
    assert (packaged / "hf" / "tokenizer.json").is_file()
    # the weights once: RUN/hf/model.safetensors is a hard link in the run, a relative symlink here
    weights = packaged / "hf" / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (packaged / "model.safetensors").resolve()
    assert not weights.readlink().is_absolute()
    texts = ["great superb", "awful dull"]
    expected = danlu.load(text_run.path).predict_proba(texts)
    assert np.allclose(danlu.load(packaged).predict_proba(texts), expected)
    assert "\ntransformers==" in (tmp_path / "pkg" / "requirements.txt").read_text()
    assert not (tmp_path / "pkg" / "run" / "cache").exists()


def test_errors_name_the_problem(tmp_path, data, encoder):
    with pytest.raises(DanluError, match="holds numbers"):
        fit(tmp_path / "a", data, encoder, "data.text=stars")
    with pytest.raises(DanluError, match="beyond the 64 positions"):
        fit(tmp_path / "b", data, encoder, "data.max_length=128")
    with pytest.raises(DanluError, match="does not exist"):
        fit(tmp_path / "c", data, "org/some-model")
    assert not (tmp_path / "a" / "report.json").exists()
