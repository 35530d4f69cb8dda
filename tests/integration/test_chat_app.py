"""The chat handler in-process (FastAPI's TestClient, lifespan and engine thread included): what a
client is told when generation fails, and what the log says of fields danlu does not use."""

import json
import logging

import pytest
from fastapi.testclient import TestClient

from danlu.serve.chat.app import FAILED, ChatSettings, create_chat_app
from danlu.serve.chat.model import load_chat_model
from tests.chat_models import tiny_llama

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    chat = load_chat_model(str(tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")))
    with TestClient(create_chat_app(chat, ChatSettings(max_tokens=16)), base_url="http://localhost") as c:
        yield c


def test_a_failure_in_the_engine_reaches_the_client_as_a_generic_message(client, monkeypatch, caplog):
    from danlu.serve.chat import output

    def broken(logits, params, uniforms):
        raise RuntimeError("internal detail: /srv/weights/shard-3 at 0x7f3a")

    monkeypatch.setattr(output, "sample", broken)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0.7}
    with caplog.at_level(logging.ERROR, logger="danlu"):
        whole = client.post("/v1/chat/completions", json=body)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    assert whole.status_code == 500 and whole.json()["error"]["message"] == FAILED
    events = [json.loads(e.removeprefix("data: ")) for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert events[-1]["error"]["message"] == FAILED and streamed.endswith("data: [DONE]\n\n")
    assert "internal detail" not in whole.text + streamed
    assert "internal detail" in caplog.text  # the server's log has it


def test_unknown_fields_are_logged_few_short_and_escaped(client, caplog):
    extra = {f"x{i}\nFORGED LOG LINE {'y' * 100}": 1 for i in range(20)}
    with caplog.at_level(logging.INFO, logger="danlu"):
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, **extra})
    assert response.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "ignoring fields" in r.getMessage()]
    assert "\n" not in line and "and 12 more" in line and "y" * 41 not in line


def test_the_token_budget_defaults_to_16384_or_the_whole_context():
    assert ChatSettings().budget(256) == 16_384
    assert ChatSettings().budget(32_768) == 32_768  # any one request the model can take fits alone
    assert ChatSettings(max_batch_tokens=60).budget(32_768) == 60


def test_a_request_over_the_timeout_gets_504_and_frees_its_place(tmp_path):
    """Nothing drives the engine (engine_thread off, no run()): the request never gets a token, and at
    --timeout the whole answer is a 504 and the stream ends with a 504 error event, then [DONE]."""
    chat = load_chat_model(str(tiny_llama(tmp_path / "tiny")))
    app = create_chat_app(chat, ChatSettings(max_tokens=4, timeout_s=0.3), engine_thread=False)
    with TestClient(app, base_url="http://localhost") as stalled:
        whole = stalled.post("/v1/chat/completions", json={"messages": HELLO})
        streamed = stalled.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}).text
        engine = app.state.shell.handler.engine
        assert all(s.cancelled for s in list(engine.inbox.queue))  # both gave their place up
    assert whole.status_code == 504 and whole.json()["error"]["type"] == "timeout"
    events = [json.loads(e.removeprefix("data: ")) for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert events[-1]["error"]["code"] == 504 and streamed.endswith("data: [DONE]\n\n")
