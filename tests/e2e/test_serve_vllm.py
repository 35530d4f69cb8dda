"""`danlu serve MODEL --engine vllm` as clients meet it: one real uvicorn process with vLLM inside, the
official openai client (streaming equal to whole, usage, stop strings), bad and hostile requests failing
alone beside a running stream, a client that leaves stopping its generation early, and SIGTERM.

Runs in .venv-vllm (`make test-vllm`): see tests/integration/test_chat_vllm.py."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import httpx
import pytest

from tests.chat_models import lora_run, tiny_llama
from tests.e2e.test_chat_server import HELLO, HOSTILE, running, scrape, wait_until
from tests.e2e.test_serve_process import Server

if os.environ.get("DANLU_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm: make test-vllm")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # enough layers that 200 tokens take long enough to act in the middle of them
    return tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", width=128, heads=2, layers=8)


@pytest.fixture(scope="module")
def run_hf(base, tmp_path_factory):
    """A fine-tuned run's hf/, beside its LoRA adapter over `base`."""
    return lora_run(base, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(run_hf):
    args = ("--engine", "vllm", "--dtype", "float32", "--max-tokens", "200", "--kv-cache-gb", "1")
    server = Server(run_hf, *args, python=sys.executable, ready_s=600)
    yield server
    assert server.stop() == 0  # SIGTERM drains and exits 0


def test_the_runs_lora_adapter_is_served_unmerged_and_answers_as_trained(server, client, base, run_hf):
    """vLLM runs the base model with the run's adapter (its LoRA support, not the merged weights): the
    greedy answer equals the torch engine's on the merged RUN/hf, and differs from the base model's."""
    from danlu.serve.chat.engine import Engine
    from danlu.serve.chat.model import load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    listed = client.models.list().data[0].model_dump()
    assert listed["lora_adapter"] == str(run_hf.parent / "adapter")
    served = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)

    def torch_answer(path) -> str:
        chat = load_chat_model(str(path), dtype="float32", engine="torch")
        events = Engine(chat).generate(
            Template(chat.tokenizer).encode_messages(HELLO), SamplingParams(max_tokens=24, temperature=0.0)
        )
        return "".join(e.text for e in events)

    assert served.choices[0].message.content == torch_answer(run_hf) != torch_answer(base)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_streaming_equals_whole_with_usage_and_stop_strings(server, client):
    listed = client.models.list().data[0].model_dump()
    assert listed["executor"] == "vllm" and listed["dtype"] == "float32"
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=24, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    families = scrape(server)
    assert families['danlu_chat_executor_info{"executor": "vllm"}'] == 1


def test_bad_and_hostile_requests_fail_alone_beside_a_stream(server):
    url = f"{server.url}/v1/chat/completions"
    long = {"messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}

    def stream() -> str:
        with httpx.stream("POST", url, json=long, timeout=300) as response:
            raw = "".join(response.iter_text())
        assert raw.endswith("data: [DONE]\n\n")
        events = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
        assert not any("error" in e for e in events)
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))

    alone = stream()
    outcome = {}
    victim = threading.Thread(target=lambda: outcome.update(text=stream()))
    victim.start()
    assert wait_until(lambda: running(server) == 1, 60)
    headers = {"content-type": "application/json"}
    for body, status, param in [*HOSTILE, ("{not json", 400, None)]:
        raw = body.replace("M", json.dumps(HELLO), 1)
        response = httpx.post(url, content=raw.encode(), headers=headers, timeout=120)
        assert response.status_code == status, (body[:80], response.text[:300])
        if status == 400:
            assert response.json()["error"]["param"] == param
    victim.join(300)
    assert outcome["text"] == alone


def test_a_client_that_leaves_stops_its_generation(server):
    for stream in (True, False):
        data = json.dumps({"messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": stream}).encode()
        before = scrape(server)["danlu_chat_generated_tokens_total{}"]
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            )
            connection.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
            assert wait_until(lambda: running(server) == 1, 60), "the request never ran"
            # vLLM's KV cache usage reaches danlu's metrics while it runs
            assert wait_until(lambda: scrape(server)["danlu_chat_kv_cache_usage{}"] > 0, 30)
        assert wait_until(lambda: running(server) == 0, 30), "the slot was not freed"
        generated = scrape(server)["danlu_chat_generated_tokens_total{}"] - before
        assert 0 < generated < 200, (stream, generated)
