"""--quantize: the CPU's int8 weight-only layers against float32 on a tiny random Llama, the engine
generating with them, and the one-line refusals where a quantization cannot run."""

import importlib.util

import pytest
import torch
from torch import nn

from danlu.errors import DanluError
from danlu.serve.chat.engine import Engine
from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.quantize import Int8Linear, bitsandbytes_config, check_quantize, weight_bytes
from danlu.serve.chat.sampling import SamplingParams
from tests.chat_models import tiny_llama
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_the_float_layer(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(3, 5, 64)
    quantized = Int8Linear(linear)
    assert quantized.qweight.dtype == torch.int8 and quantized.qweight.shape == (48, 64)
    expected, got = linear(x), quantized(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    # int8 weights with per-channel scales and bf16 activations: about 1% of the output's scale
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert not torch.equal(got, expected)  # it really is the quantized path


def test_int8_model_keeps_the_float_model_answers_close(folder):
    full = load_chat_model(str(folder))
    int8 = load_chat_model(str(folder), quantize="int8")
    assert int8.quantize == "int8" and full.quantize is None
    linears = [m for m in full.model.modules() if type(m) is nn.Linear]
    assert len(linears) == sum(isinstance(m, Int8Linear) for m in int8.model.modules()) > 0
    assert not any(type(m) is nn.Linear for m in int8.model.modules())
    assert int8.weight_bytes < full.weight_bytes == weight_bytes(full.model)
    ids = torch.tensor([full.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.inference_mode():
        a, b = full.model(ids).logits.float(), int8.model(ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cosine > 0.999, cosine
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_the_engine_generates_with_int8_weights(folder):
    chat = load_chat_model(str(folder), quantize="int8")
    chat.eos_ids = set()
    engine = Engine(chat, max_batch=2)  # generate() steps it on this thread
    prompt = chat.tokenizer("hello there")["input_ids"]
    events = list(engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0)))
    assert events[-1].finish_reason == "length"
    assert "".join(e.text for e in events).strip()


def test_quantizations_that_cannot_run_are_one_line(folder):
    with pytest.raises(DanluError, match="nf4 needs a CUDA GPU"):
        check_quantize("nf4", torch.device("cpu"))
    with pytest.raises(DanluError, match="unknown --quantize"):
        check_quantize("int4", torch.device("cpu"))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(DanluError, match="needs bitsandbytes"):
            check_quantize("int8", torch.device("cuda"))
    result = run_cli("chat", str(folder), "--quantize", "nf4", "--prompt", "hi")
    assert result.returncode == 2 and "nf4 needs a CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bitsandbytes_configs_ask_for_what_the_flag_says():
    int8 = bitsandbytes_config("int8", torch.float16)
    assert int8.load_in_8bit and not int8.load_in_4bit
    nf4 = bitsandbytes_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
