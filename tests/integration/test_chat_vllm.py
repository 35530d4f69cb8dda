"""The vllm engine, for real: vLLM's CPU build runs a tiny random Llama in float32 behind danlu's engine
interface. Greedy tokens equal vLLM's own on the same prompt ids (alone and in a batch) and the torch
engine's; stop strings and cancelling abort the vLLM request; seeds reproduce; one bad request fails
alone; the chat app serves it through the official openai client, streaming equal to whole.

vLLM pins its own transformers, so these run in .venv-vllm (`make test-vllm`, part of `make test`), which
sets DANLU_REQUIRE_VLLM: there a missing vLLM fails instead of skipping. One engine is started for the
whole module (vLLM takes a minute or more to start on 2 cores)."""

from __future__ import annotations

import os
import threading

import pytest

from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.output import Sequence
from danlu.serve.chat.sampling import SamplingParams
from danlu.serve.chat.templates import Template
from tests.chat_models import tiny_llama

if os.environ.get("DANLU_REQUIRE_VLLM"):
    import vllm  # noqa: F401  # make test-vllm: vLLM must be there
else:
    pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm: make test-vllm")

pytestmark = pytest.mark.slow

QUESTIONS = ["hello there", "one two three four", "the quick brown fox jumps over the lazy dog", "why"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", width=128, heads=2)


@pytest.fixture(scope="module")
def chat(model_dir):
    chat = load_chat_model(str(model_dir), dtype="float32", engine="vllm")
    yield chat
    chat.model.close()


@pytest.fixture(scope="module")
def prompts(chat):
    template = Template(chat.tokenizer)
    return [template.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS]


def engine(chat, **options):
    from danlu.serve.chat.engine import engine_for

    return engine_for(chat, max_batch=8, **options)


def answer(eng, prompts, params) -> list[Sequence]:
    """Every prompt submitted at once, run to the end on this thread."""
    done = [threading.Event() for _ in prompts]
    sequences = []
    for i, ids in enumerate(prompts):
        sequence = Sequence(ids, params, lambda e, i=i: e.finish_reason and done[i].set())
        sequence.texts = []
        sequence.emit = lambda e, i=i, s=sequence: (s.texts.append(e), e.finish_reason and done[i].set())
        sequences.append(eng.submit(sequence))
    eng.run(until=lambda: all(d.is_set() for d in done))
    return sequences


def vllm_greedy(chat, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """vLLM's own greedy tokens for the prompt ids, on the same engine, without danlu in between."""
    from vllm import SamplingParams as VllmSamplingParams

    params = VllmSamplingParams(
        temperature=0.0, max_tokens=max_tokens, stop_token_ids=sorted(chat.eos_ids), detokenize=False
    )

    async def whole() -> tuple[list[int], object]:
        request = {"prompt_token_ids": prompt_ids}
        outputs = [o async for o in chat.model.engine.generate(request, params, "reference")]
        return list(outputs[-1].outputs[0].token_ids), outputs[-1].outputs[0].stop_reason

    tokens, ender = chat.model.loop.run_until_complete(whole())
    if isinstance(ender, int) and (not tokens or tokens[-1] != ender):
        tokens.append(ender)  # the end-of-turn token it stopped at, which danlu counts as output
    return tokens


def test_greedy_tokens_equal_vllm_alone_and_in_a_batch(chat, prompts):
    # danlu's default KV cache on the CPU (vLLM's own would take all the memory it may use)
    assert chat.model.engine.vllm_config.cache_config.kv_cache_memory_bytes <= 4 * 2**30
    params = SamplingParams(max_tokens=24, temperature=0.0)
    reference = [vllm_greedy(chat, ids, 24) for ids in prompts]
    alone = [answer(engine(chat), [ids], params)[0] for ids in prompts]
    batch = answer(engine(chat), prompts, params)
    for ref, one, together in zip(reference, alone, batch, strict=True):
        assert one.output == ref and together.output == ref
        assert one.finish_reason == ("stop" if ref[-1] in chat.eos_ids else "length")
    text = "".join(e.text for e in batch[0].texts)
    assert text == chat.tokenizer.decode(batch[0].output, skip_special_tokens=True)


def test_the_same_prompt_ids_and_tokens_as_the_torch_engine(chat, model_dir, prompts):
    from danlu.serve.chat.engine import Engine

    torch_chat = load_chat_model(str(model_dir), dtype="float32", engine="torch")
    assert (
        Template(torch_chat.tokenizer).encode_messages([{"role": "user", "content": QUESTIONS[2]}])
        == (prompts[2])
    )
    params = SamplingParams(max_tokens=16, temperature=0.0)
    on_torch = answer(Engine(torch_chat, max_batch=8), prompts, params)
    on_vllm = answer(engine(chat), prompts, params)
    assert [s.output for s in on_vllm] == [s.output for s in on_torch]


def test_a_stop_string_ends_the_answer_and_the_vllm_request(chat, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    whole = answer(engine(chat), prompts[:1], params)[0]
    text = "".join(e.text for e in whole.texts)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    eng = engine(chat)
    stopped = answer(eng, prompts[:1], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
    got = "".join(e.text for e in stopped.texts)
    assert stopped.finish_reason == "stop" and got == text[: text.index(stop)]
    assert not eng.active and not chat.model.engine.get_num_unfinished_requests()


def test_cancelling_aborts_the_request_at_once(chat, prompts):
    eng = engine(chat)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=1)
    events = []
    sequence = Sequence(prompts[1], params, events.append)
    eng.submit(sequence)
    eng.run(until=lambda: len(sequence.output) >= 2)
    assert 0 < eng.kv_usage <= 1  # vLLM's own figure: the running request holds cache blocks
    sequence.cancel()
    eng.run(until=lambda: sequence.finish_reason is not None)
    assert sequence.finish_reason == "cancelled" and len(sequence.output) < 200
    assert not eng.active and not chat.model.engine.get_num_unfinished_requests()


def test_max_batch_bounds_the_requests_in_vllm_and_the_rest_wait(chat, prompts):
    from danlu.serve.chat.engine import engine_for

    eng = engine_for(chat, max_batch=1)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    first, second = (Sequence(ids, params, lambda e: None) for ids in prompts[:2])
    eng.submit(first)
    eng.submit(second)
    eng.run(until=lambda: len(first.output) >= 1)
    assert eng.load == (1, 1) and not second.output  # the second waits in danlu's queue, counted there
    eng.run(until=lambda: second.finish_reason is not None)
    together = answer(engine(chat), prompts[:2], params)
    assert [first.output, second.output] == [s.output for s in together]


def test_seeds_reproduce_and_a_bad_request_fails_alone(chat, prompts):
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = answer(engine(chat), prompts[:2], sampled)
    again = answer(engine(chat), prompts[:2], sampled)
    assert [s.output for s in first] == [s.output for s in again]
    # a request vLLM refuses (a prompt over its max_model_len, queued past danlu's own check) fails alone
    eng = engine(chat)
    done = threading.Event()
    bad = Sequence(prompts[0] * chat.context, SamplingParams(max_tokens=8), lambda e: None)
    bad.texts = []
    bad.emit = lambda e: (bad.texts.append(e), e.finish_reason and done.set())
    eng.inbox.put(bad)
    (good,) = answer(eng, prompts[:1], SamplingParams(max_tokens=8))
    assert done.is_set() and bad.finish_reason == "error" and bad.texts[-1].error
    assert good.finish_reason in ("stop", "length") and good.output


def test_the_chat_app_serves_it_through_the_openai_client(chat):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from danlu.serve.chat.app import ChatSettings, create_chat_app

    app = create_chat_app(chat, ChatSettings(max_tokens=32))
    with TestClient(app) as http:
        client = OpenAI(base_url="http://localhost/v1", api_key="none", http_client=http)
        listed = client.models.list().data[0].model_dump()
        assert listed["executor"] == "vllm" and listed["engine_reason"] == "asked for"
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
        stream = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
