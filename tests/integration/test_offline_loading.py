"""Loading never reaches the network: every kind of model danlu loads (a chat directory, a GGUF file under
both engines, a text encoder for training and its finished run, GGUF export and its verification) loads
and runs with the hub's offline variables unset, while a guard fails the test on any lookup or
connection outside loopback. transformers' hub kernels stay off on every model danlu loads."""

import contextlib
import importlib.util

import pytest

import danlu
from danlu.serve.chat.engine import Engine
from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.sampling import SamplingParams
from tests.chat_models import tiny_gguf, tiny_llama
from tests.texts import reviews, tiny_encoder

NO_LLAMA = importlib.util.find_spec("llama_cpp") is None


def test_the_guard_sees_network_access_that_the_caller_swallows(no_network):
    """The guard itself: a lookup and a connection are recorded though the code catches their errors."""
    import socket

    for host in ("huggingface.co", "203.0.113.7"):
        with contextlib.suppress(OSError):
            socket.create_connection((host, 443), timeout=1).close()
    assert len(no_network) == 2 and "huggingface.co" in no_network[0], no_network
    no_network.clear()


def answer(chat) -> list[int]:
    chat.eos_ids = set()
    prompt = chat.tokenizer("hello there")["input_ids"]
    events = list(Engine(chat, max_batch=1).generate(prompt, SamplingParams(max_tokens=4, temperature=0)))
    assert events[-1].finish_reason == "length" and not events[-1].error
    return prompt


def test_chat_models_load_and_answer_offline_without_hub_kernels(no_network, tmp_path):
    chat = load_chat_model(str(tiny_llama(tmp_path / "tiny")))
    assert chat.model.use_kernels is False  # transformers 5.25 turns them on unless told
    answer(chat)
    gguf_file = tiny_gguf(tmp_path / "gguf")
    answer(load_chat_model(str(gguf_file), engine="torch"))  # dequantized by transformers
    if not NO_LLAMA:
        answer(load_chat_model(str(gguf_file), engine="llama.cpp"))


def test_a_text_encoder_trains_and_its_run_predicts_offline(no_network, tmp_path):
    data = tmp_path / "reviews.csv"
    reviews(64).to_csv(data, index=False)
    encoder = tiny_encoder(tmp_path / "bert")
    overrides = [f"data.train={data}", "data.target=label", f"model.pretrained={encoder}", "train.epochs=1"]
    run = danlu.train(None, [*overrides, "data.text=review", "data.max_length=32"], out=tmp_path / "run")
    assert len(danlu.load(run.path).predict(["a great film", "a dull plot"])) == 2


@pytest.mark.skipif(NO_LLAMA, reason="GGUF export verifies through llama.cpp (make setup installs it)")
def test_gguf_export_and_its_verification_run_offline(no_network, tmp_path):
    from danlu.export import gguf

    result = gguf.export_gguf(tiny_llama(tmp_path / "hf"), "f16", tmp_path / "tiny.gguf")
    assert result["tokenizer_matches"] and result["greedy"] and (tmp_path / "tiny.gguf").is_file()
