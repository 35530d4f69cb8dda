"""The chat handler in-process (FastAPI's TestClient, lifespan and engine thread included): what a
client is told when generation fails, and what the log says of fields danlu does not use."""

import json
import logging

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from danlu.serve.chat.app import FAILED, ChatSettings, create_chat_app
from danlu.serve.chat.model import load_chat_model
from tests.chat_models import tiny_llama
from tests.strategies import JSON_VALUES

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


def body(mode: str) -> st.SearchStrategy:
    """Request bodies: each field a value in range ("valid", with messages and prompt always there), in
    range or out of it ("mixed"), or any of those or any JSON at all ("any")."""

    def field(valid: st.SearchStrategy, invalid: st.SearchStrategy | None = None) -> st.SearchStrategy:
        choices = [valid] + ([invalid] if invalid is not None and mode != "valid" else [])
        return st.one_of(*choices, *([JSON_VALUES] if mode == "any" else []))

    part = st.fixed_dictionaries({"type": field(st.just("text")), "text": field(st.text(max_size=12))})
    role = field(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "", "User"]))
    message = field(
        st.fixed_dictionaries(
            {"role": role, "content": field(st.text(max_size=20) | st.lists(part, max_size=2))}
        )
    )
    text = field(st.text(min_size=1, max_size=20), st.just("") | st.lists(st.text(max_size=10), max_size=2))
    fields = {
        "messages": field(st.lists(message, min_size=1, max_size=3), st.just([])),
        "prompt": text,
        "max_tokens": field(st.integers(1, 16), st.integers(-2, 0) | st.integers(17, 10**6)),
        "max_completion_tokens": field(st.integers(1, 16), st.integers(-2, 0)),
        "temperature": field(st.floats(0, 2), st.floats(-1, -1e-9) | st.floats(2.01, 1e6)),
        "top_p": field(st.floats(0, 1), st.floats(1.01, 2)),
        "top_k": field(st.integers(0, 2**31 - 1), st.integers(-5, -1) | st.integers(2**31, 2**70)),
        "stop": field(
            st.text(max_size=64) | st.lists(st.text(max_size=5), max_size=4),
            st.text(min_size=65, max_size=70) | st.lists(st.text(max_size=5), min_size=5, max_size=6),
        ),
        "seed": field(st.integers(-(2**63), 2**64 - 1), st.integers(2**64, 2**70)),
        "n": field(st.just(1), st.integers(2, 3) | st.just(0)),
        "frequency_penalty": field(st.floats(-2, 2), st.floats(2.01, 5)),
        "presence_penalty": field(st.floats(-2, 2), st.floats(-5, -2.01)),
        "repetition_penalty": field(st.floats(0.01, 10), st.floats(-1, 0.0099)),
        "stream": field(st.booleans()),
        "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    }
    required = ("messages", "prompt") if mode == "valid" else ()
    return st.fixed_dictionaries(
        {k: fields[k] for k in required}, optional={k: v for k, v in fields.items() if k not in required}
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["valid", "mixed", "any"]).flatmap(lambda m: st.tuples(st.just(m), body(m))),
    st.booleans(),
)
def test_any_body_gets_an_answer_or_an_openai_400(client, request_body, chat_api):
    """Any JSON body, its fields of the kinds clients send or of any JSON at all, to either endpoint:
    a 200 with an answer (whole, or a stream that ends with [DONE]) or a 400 in OpenAI's error shape;
    never another status, and always a 200 where every field is in range."""
    mode, sent = request_body
    url = "/v1/chat/completions" if chat_api else "/v1/completions"
    response = client.post(url, json=sent)
    assert response.status_code in ((200,) if mode == "valid" else (200, 400)), (sent, response.text[:300])
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length"), response.text[:300]
