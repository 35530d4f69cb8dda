"""The CUDA paths: device placement, bf16/fp16 autocast with the fp16 grad scaler, chunked loading to the
GPU, and runs trained on a GPU loading on the CPU. Skipped where torch sees no CUDA GPU (CI); run them on a
GPU machine with `python -m pytest tests/gpu`."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import danlu
from tests.conftest import mixed_frame
from tests.integration.test_training import fit, weights_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_at_each_precision(tmp_path, mixed_csv, precision):
    run = fit(
        tmp_path / "run",
        mixed_csv,
        "label",
        "train.device=cuda",
        f"train.precision={precision}",
        "train.epochs=40",
        "model.hidden=[16]",
    )
    assert run.report["device"].startswith("cuda")
    assert torch.isfinite(weights_of(run)).all()
    frame = mixed_frame(200, seed=9)
    gpu_predictor = danlu.load(run.path, device="cuda")
    on_gpu = gpu_predictor.predict_proba(frame)
    on_cpu = danlu.load(run.path, device="cpu").predict_proba(frame)
    assert np.allclose(on_gpu, on_cpu, atol=1e-4)
    assert skm.accuracy_score(frame["label"], gpu_predictor.predict(frame)) > 0.6


def test_chunked_training_on_cuda_matches_in_memory(tmp_path):
    data = tmp_path / "mixed.parquet"  # chunked reading needs Parquet or NPY; CSV is always read whole
    mixed_frame(3000).to_parquet(data, row_group_size=1024)
    common = ("train.device=cuda", "train.epochs=5", "model.hidden=[16]", "model.dropout=0")
    in_memory = fit(tmp_path / "a", data, "label", *common, "data.in_memory=true")
    chunked = fit(tmp_path / "b", data, "label", *common, "data.in_memory=false", "data.chunk_rows=1024")
    assert not chunked.report["in_memory"]
    assert chunked.report["test"]["accuracy"] > 0.5
    assert sum(in_memory.report["rows"].values()) == sum(chunked.report["rows"].values()) == 3000


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_chat_model_on_cuda_at_each_quantization(tmp_path, quantize):
    from danlu.serve.chat.engine import Engine
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from tests.chat_models import tiny_llama

    if quantize:
        pytest.importorskip("bitsandbytes")
    folder = tiny_llama(tmp_path / "tiny")
    chat = load_chat_model(str(folder), device="cuda", quantize=quantize)
    reference = load_chat_model(str(folder))
    assert chat.quantize == quantize and chat.weight_bytes < reference.weight_bytes
    ids = torch.tensor([reference.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.inference_mode():
        got = chat.model(ids.cuda()).logits.float().cpu()
        expected = reference.model(ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > (0.99 if quantize != "nf4" else 0.95), cosine
    chat.eos_ids = set()
    events = list(
        Engine(chat, max_batch=2).generate(ids[0].tolist(), SamplingParams(max_tokens=8, temperature=0))
    )
    assert events[-1].finish_reason == "length"
