"""What a user with an NVIDIA GPU does first, checked on the GPU: each family trains on CUDA (tables at every
precision, images and texts in bf16) and predicts what the CPU predicts from the same run; an export of a
GPU-trained run verifies itself; `danlu serve MODEL --device cuda` answers the openai client, streaming;
a chat model loads and answers in bfloat16, int8 and nf4 without touching the network. Every model is
built here, tiny and random: nothing is downloaded.

Skipped where torch sees no CUDA GPU (CI). Run them with `make test-gpu` (which installs a CUDA build of
torch into .venv first where it has a CPU build), or `python -m pytest tests/gpu`. DANLU_GPU_TEST_DEVICE=cpu
runs the same checks on the CPU, to try a change to these tests on a machine without a GPU."""

import os

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import danlu
from tests.conftest import mixed_frame
from tests.integration.test_training import fit, weights_of

DEVICE = os.environ.get("DANLU_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_both_devices(run, items) -> tuple[np.ndarray, np.ndarray]:
    """The run's probabilities for the same items on the training device and on the CPU."""
    return danlu.load(run.path, device=DEVICE).predict_proba(items), danlu.load(run.path).predict_proba(items)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_tables_train_at_each_precision_and_predict_as_on_the_cpu(tmp_path, mixed_csv, precision):
    if precision == "fp16" and not ON_GPU:
        pytest.skip("fp16 autocast is a GPU precision")
    run = fit(
        tmp_path / "run",
        mixed_csv,
        "label",
        f"train.device={DEVICE}",
        f"train.precision={precision}",
        "train.epochs=40",
        "model.hidden=[16]",
    )
    assert run.report["device"].startswith(DEVICE) and run.report["precision"] == precision
    assert torch.isfinite(weights_of(run)).all()
    frame = mixed_frame(200, seed=9)
    here, on_cpu = on_both_devices(run, frame)
    assert np.allclose(here, on_cpu, atol=1e-4)
    assert skm.accuracy_score(frame["label"], danlu.load(run.path, device=DEVICE).predict(frame)) > 0.6


def test_chunked_training_on_the_gpu_matches_in_memory(tmp_path):
    data = tmp_path / "mixed.parquet"  # chunked reading needs Parquet or NPY; CSV is always read whole
    mixed_frame(3000).to_parquet(data, row_group_size=1024)
    common = (f"train.device={DEVICE}", "train.epochs=5", "model.hidden=[16]", "model.dropout=0")
    in_memory = fit(tmp_path / "a", data, "label", *common, "data.in_memory=true")
    chunked = fit(tmp_path / "b", data, "label", *common, "data.in_memory=false", "data.chunk_rows=1024")
    assert not chunked.report["in_memory"]
    assert chunked.report["test"]["accuracy"] > 0.5
    assert sum(in_memory.report["rows"].values()) == sum(chunked.report["rows"].values()) == 3000


def test_images_train_in_bf16_and_predict_as_on_the_cpu(tmp_path):
    from tests.images import image_folder
    from tests.integration.test_images import FAST

    folder = image_folder(tmp_path / "shapes", n=150)
    overrides = [f"data.train={folder}", *FAST, f"train.device={DEVICE}", "train.precision=bf16"]
    run = danlu.train(None, overrides, out=tmp_path / "run", progress=False)
    assert run.report["device"].startswith(DEVICE) and run.report["precision"] == "bf16"
    assert run.report["test"]["accuracy"] > 0.8
    paths = sorted(str(p) for p in folder.rglob("*.png"))[:30]
    here, on_cpu = on_both_devices(run, paths)
    # cuDNN convolutions run in TF32 by default: the GPU's float32 answers round more than the CPU's
    assert np.allclose(here, on_cpu, atol=2e-3)
    assert (here.argmax(1) == on_cpu.argmax(1)).mean() >= 0.95


def test_texts_fine_tune_in_bf16_and_predict_as_on_the_cpu(tmp_path):
    from tests.integration.test_text import FAST
    from tests.texts import reviews, tiny_encoder

    data = tmp_path / "reviews.csv"
    reviews(240).to_csv(data, index=False)
    encoder = tiny_encoder(tmp_path / "bert")
    overrides = [f"data.train={data}", "data.target=label", f"model.pretrained={encoder}", *FAST]
    run = danlu.train(
        None,
        [*overrides, f"train.device={DEVICE}", "train.precision=bf16"],
        out=tmp_path / "run",
        progress=False,
    )
    assert run.report["device"].startswith(DEVICE) and run.report["precision"] == "bf16"
    assert run.report["test"]["accuracy"] > 0.9
    texts = reviews(40, seed=5)["review"].tolist()
    here, on_cpu = on_both_devices(run, texts)
    assert np.allclose(here, on_cpu, atol=1e-4)


def test_an_onnx_export_of_a_gpu_trained_run_verifies(tmp_path, mixed_csv):
    from danlu.export import export_run

    run = fit(tmp_path / "run", mixed_csv, "label", f"train.device={DEVICE}", "train.epochs=10")
    result = export_run(run.path, "onnx")
    assert result["max_abs_diff"] < 1e-4 and result["metric_drop"] <= 0.01
    assert os.path.isfile(result["path"])


def test_danlu_serve_on_the_gpu_answers_the_openai_client_streaming(tmp_path):
    from openai import OpenAI

    from tests.chat_models import tiny_llama
    from tests.e2e.test_serve_process import Server

    server = Server(tiny_llama(tmp_path / "tiny"), "--device", DEVICE, "--max-tokens", "32")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        listed = client.models.list().data[0].model_dump()
        assert listed["executor"] == "torch" and listed["dtype"] == ("bfloat16" if ON_GPU else "float32")
        hello = [{"role": "user", "content": "hello there"}]
        whole = client.chat.completions.create(model="tiny", messages=hello, max_tokens=24, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=hello, max_tokens=24, temperature=0, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    finally:
        server.stop()


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_a_chat_model_loads_offline_and_answers_at_each_quantization(tmp_path, quantize, no_network):
    from danlu.serve.chat.engine import Engine
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from tests.chat_models import tiny_llama

    if quantize == "nf4" and not ON_GPU:
        pytest.skip("nf4 is bitsandbytes', on CUDA only")
    if quantize and ON_GPU:
        pytest.importorskip("bitsandbytes")
    folder = tiny_llama(tmp_path / "tiny")
    # loaded with the offline variables unset and any connection refused: transformers' hub kernels
    # (and anything else) must not be fetched
    chat = load_chat_model(str(folder), device=DEVICE, quantize=quantize)
    reference = load_chat_model(str(folder))
    assert chat.quantize == quantize
    if quantize or ON_GPU:  # bfloat16 on the GPU, int8 or 4 bits: fewer bytes than float32
        assert chat.weight_bytes < reference.weight_bytes
    assert chat.model.use_kernels is False
    ids = torch.tensor([reference.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.inference_mode():
        got = chat.model(ids.to(DEVICE)).logits.float().cpu()
        expected = reference.model(ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > (0.99 if quantize != "nf4" else 0.95), cosine
    chat.eos_ids = set()
    events = list(
        Engine(chat, max_batch=2).generate(ids[0].tolist(), SamplingParams(max_tokens=8, temperature=0))
    )
    assert events[-1].finish_reason == "length" and not events[-1].error
